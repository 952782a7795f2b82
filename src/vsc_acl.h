/*
 * vsockcompat C core: client privileges and groups (vsockcompat/privileges.py and
 * access.py, in C), so C and Python processes obey the same access rules.
 *
 * Storage, shared with the Python side on the local transport:
 *
 *   <rundir>/c<cid>/<rid>.acl     a resource's client privileges:
 *       vsockcompat-acl 1 <kind>                        kind: datagram|sharedmem|queuepair|group
 *       <client cid> <client rid> <privilege> allow|deny  (one line per set privilege)
 *   <rundir>/c2/<rid>.group       a group, alive while its owner process runs:
 *       vsockcompat-group 1 <owner cid> <owner pid> <owner start ticks>
 *       <member cid> <member rid> <can assign 0|1>        (one line per member)
 *
 * Both are written whole (temporary file, then rename) under the context lock
 * (c<cid>/.lock). A privileges file that cannot be parsed fails closed: DG_SEND and
 * SM_ATTACH are denied to everyone. A change of a datagram endpoint's privileges
 * bumps the ACL epoch word of its queue account page (VSC_ACCT_OFF_ACL_EPOCH).
 *
 * The rule (only an explicit denial refuses): the owner context (resource cid, 0)
 * holds CH_PRIV and DESTROY_RESOURCE; otherwise the client's own setting decides,
 * then that of its context (cid, 0), then the first group (by handle) that sets the
 * privilege and of which the client or its context is a member, the public group
 * (2, 1023), of which every handle is a member, last.
 */
#ifndef VSC_ACL_H
#define VSC_ACL_H

#include <stddef.h>
#include <stdint.h>

#include "vsc_local.h"
#include "vsc_policy.h"

#define VSC_KIND_NONE      (-1)
#define VSC_KIND_DATAGRAM  0
#define VSC_KIND_SHAREDMEM 1
#define VSC_KIND_QUEUEPAIR 2
#define VSC_KIND_GROUP     3
#define VSC_NKINDS         4

#define VSC_ACL_FILE_MAX (1 << 20) /* a longer privileges or group file is damaged */
#define VSC_PUBLIC_GROUP_RID VMCI_RESERVED_RESOURCE_ID_MAX /* (VMCI_HOST_CONTEXT_ID, 1023) */

typedef struct {
    vsc_handle client;
    int state[VMCI_NUM_PRIVILEGES]; /* 0: not set, VMCI_PRIV_ALLOW or VMCI_PRIV_DENY */
} vsc_acl_entry;

typedef struct {
    int kind;
    int n;                  /* entries, sorted by client (context, then resource), unique */
    vsc_acl_entry *entries; /* malloc'ed; NULL when n == 0 */
} vsc_acl;

typedef struct {
    vsc_handle member;
    int can_assign;
} vsc_group_member;

typedef struct {
    uint32_t owner_cid;
    uint64_t owner_pid, owner_start;
    int n;
    vsc_group_member *members; /* malloc'ed; NULL when n == 0 */
} vsc_group;

/* The model (no files) */

/* "datagram" ... "group" -> VSC_KIND_*, or VSC_KIND_NONE; and back (NULL for none). */
int vsc_acl_kind_parse(const char *name, size_t len);
const char *vsc_acl_kind_name(int kind);
/* Whether a resource of kind takes privilege priv (anything else is VMCI_ERROR_INVALID_PRIV). */
int vsc_acl_valid_for(int kind, int priv);

/* Parse len bytes (any bytes). 0 with *out filled, or -1 (malformed or out of memory). */
int vsc_acl_parse(const char *text, size_t len, vsc_acl *out);
/* The storage text of acl, malloc'ed and NUL-terminated; NULL if out of memory. */
char *vsc_acl_format(const vsc_acl *acl, size_t *len);
void vsc_acl_free(vsc_acl *acl);
/* The fail-closed privileges of an unreadable file: the public group denied DG_SEND and SM_ATTACH. */
int vsc_acl_fail_closed(vsc_acl *out);

/* VMCI_PRIV_ALLOW or VMCI_PRIV_DENY as set for client itself, else 0. */
int vsc_acl_own_state(const vsc_acl *acl, vsc_handle client, int priv);
/* Set (VMCI_PRIV_ALLOW/DENY) or clear (0) one privilege; 0, or -1 out of memory. */
int vsc_acl_set(vsc_acl *acl, vsc_handle client, int priv, int state);

/* Whether member (or its context (cid, 0)) belongs to the live group `group`; arg is the caller's. */
typedef int (*vsc_acl_member_fn)(void *arg, vsc_handle group, vsc_handle member);
/*
 * VMCIResource_CheckClientPrivilege on acl (NULL: nothing set) of resource:
 * VMCI_SUCCESS_ACCESS_GRANTED, VMCI_ERROR_NO_ACCESS, or VMCI_ERROR_INVALID_PRIV when not set.
 * member may be NULL (no groups but the public one).
 */
int vsc_acl_check(const vsc_acl *acl, vsc_handle resource, vsc_handle client, int priv,
                  vsc_acl_member_fn member, void *arg);

/* Parse a group file (any bytes). 0 with *out filled, or -1. */
int vsc_group_parse(const char *text, size_t len, vsc_group *out);
void vsc_group_free(vsc_group *g);
/* Whether h or its context (h.context, 0) is listed in g. */
int vsc_group_has(const vsc_group *g, vsc_handle h);

/* The storage (local transport) */

/* resource's privileges: 1 with *acl filled (a damaged file gives vsc_acl_fail_closed), 0 if none
 * are set (or out of memory: nothing to enforce is better than refusing what nobody denied). */
int vsc_acl_load(const vsc_local *t, vsc_handle resource, vsc_acl *acl);
/* vsc_acl_check with the groups of the runtime directory; acl NULL: nothing set. */
int vsc_acl_check_stored(const vsc_local *t, const vsc_acl *acl, vsc_handle resource, vsc_handle client,
                         int priv);
/* Whether a datagram from src may reach dst: the policy's flags let their contexts interact
 * (t->policy) and DG_SEND is not explicitly denied. */
int vsc_acl_may_send(const vsc_local *t, vsc_handle src, vsc_handle dst);
/* The same with dst's privileges already loaded (NULL: none set). */
int vsc_acl_sender_allowed(const vsc_local *t, const vsc_acl *acl, vsc_handle src, vsc_handle dst);
/* Whether context cid may attach the shared memory region (flags, then SM_ATTACH). */
int vsc_acl_may_attach(const vsc_local *t, uint32_t cid, vsc_handle region);
/* What lives at resource: VSC_KIND_* or VSC_KIND_NONE. */
int vsc_acl_kind_of(const vsc_local *t, vsc_handle resource);

/*
 * VMCIResource_AddClientPrivileges on behalf of context t->cid, with the Python side's codes:
 * VMCI_ERROR_INVALID_ARGS (no such resource, a bad count or array, both lists empty),
 * VMCI_ERROR_NO_ACCESS (t->cid neither owns the resource nor holds CH_PRIV on it, or the files
 * belong to another user), VMCI_ERROR_INVALID_PRIV (a number that names no privilege, or one the
 * resource's kind does not take; nothing changes). Deny wins. VMCI_SUCCESS otherwise.
 */
int vsc_acl_add(const vsc_local *t, vsc_handle resource, vsc_handle client, int nallow, const int *allow,
                int ndeny, const int *deny);

/*
 * Over vsock and hybrid (vsc_links_streamed) the storage is this process's memory
 * (src/vsc_acl_memory.c): only its own resources have privileges, registered while they live:
 * datagram endpoints (with their account page, whose epoch a change bumps) and the mirrored
 * regions it serves (src/vsc_mirror_serve.c); the functions above use it.
 */
/* resource, of kind, lives in this process (acct: a datagram endpoint's page, NULL for a mirrored
 * region); 0, or -1 out of memory. Its privileges die with it (unregister). */
int vsc_acl_memory_register(vsc_handle resource, int kind, uint8_t *acct);
void vsc_acl_memory_unregister(vsc_handle resource);
void vsc_acl_memory_forget_all(void); /* in a forked child */
int vsc_acl_memory_kind(vsc_handle resource); /* its registered VSC_KIND_*, or VSC_KIND_NONE */
void vsc_acl_memory_lock(void);   /* held across a load, edit and store */
void vsc_acl_memory_unlock(void);
int vsc_acl_memory_load(vsc_handle resource, vsc_acl *acl); /* as vsc_acl_load */
int vsc_acl_memory_store(vsc_handle resource, const vsc_acl *acl); /* a VMCI code */

/* The ACL epoch of an account page (acquire load). */
static inline uint64_t vsc_acl_epoch(const uint8_t *acct)
{
    return __atomic_load_n((const uint64_t *)(acct + VSC_ACCT_OFF_ACL_EPOCH), __ATOMIC_ACQUIRE);
}

#endif
