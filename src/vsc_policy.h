/*
 * vsockcompat C core: the operator's access policy (vsockcompat/policy.py), the part
 * libvmci.so.0 needs: each context's RESTRICTED/TRUSTED flags and owning user.
 *
 * The file is TOML (VSOCKCOMPAT_POLICY, else <rundir>/policy.toml if it exists). C
 * reads the subset policy.py documents, line by line: comments, [discovery] with
 * register = "...", [contexts] and [contexts.<cid>] (the cid bare or in double
 * quotes) with flags = ["restricted", "trusted"] (an array may span lines) and
 * uid = <integer>. Anything else, including valid TOML outside that subset, is an
 * error naming the line: VMCI_InitApp then refuses (fails closed), as Python does
 * for a malformed file.
 */
#ifndef VSC_POLICY_H
#define VSC_POLICY_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t cid;
    int flags;      /* VMCI_PRIVILEGE_FLAG_* */
    int has_uid;
    uint32_t uid;   /* the only user that may act as cid, when has_uid */
} vsc_policy_context;

typedef struct vsc_policy {
    int n;
    vsc_policy_context *contexts; /* malloc'ed, in file order, cids unique */
} vsc_policy;

/* Parse len bytes. 0 with *out filled; -1 with *line (1-based) and *why set. */
int vsc_policy_parse(const char *text, size_t len, vsc_policy *out, int *line, const char **why);
/* The policy in effect for rundir: 0 (no file: the built-in policy, n == 0), or -1 with a
 * message naming the file and line in err. */
int vsc_policy_load(const char *rundir, vsc_policy *out, char *err, size_t err_size);
void vsc_policy_free(vsc_policy *p);

/* The flags of context cid (p NULL: the built-in policy: 0 and 1 are trusted). */
int vsc_policy_flags(const vsc_policy *p, uint32_t cid);
/* Whether contexts a and b may not interact: a RESTRICTED one talks only to TRUSTED ones. */
int vsc_policy_denies(const vsc_policy *p, uint32_t a, uint32_t b);
/* 1 with *uid if the policy reserves cid for one user, else 0. */
int vsc_policy_uid(const vsc_policy *p, uint32_t cid, uint32_t *uid);

#endif
