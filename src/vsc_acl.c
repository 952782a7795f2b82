/* vsockcompat C core: client privileges and groups (vsc_acl.h; vsockcompat/privileges.py, access.py). */
#define _GNU_SOURCE
#include "vsc_acl.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define ACL_MAGIC "vsockcompat-acl"
#define GROUP_MAGIC "vsockcompat-group"
#define PATH_BUF 4096
#define MAX_TOKENS 6

static const char *const KIND_NAMES[VSC_NKINDS] = {"datagram", "sharedmem", "queuepair", "group"};
/* Bit i: privilege i is valid for the kind (CH_PRIV and DESTROY_RESOURCE for every kind). */
static const unsigned VALID[VSC_NKINDS] = {
    1u << VMCI_PRIV_CH_PRIV | 1u << VMCI_PRIV_DESTROY_RESOURCE | 1u << VMCI_PRIV_DG_SEND,
    1u << VMCI_PRIV_CH_PRIV | 1u << VMCI_PRIV_DESTROY_RESOURCE | 1u << VMCI_PRIV_SM_ATTACH,
    1u << VMCI_PRIV_CH_PRIV | 1u << VMCI_PRIV_DESTROY_RESOURCE,
    1u << VMCI_PRIV_CH_PRIV | 1u << VMCI_PRIV_DESTROY_RESOURCE | 1u << VMCI_PRIV_ASSIGN_CLIENT,
};
static const vsc_handle PUBLIC_GROUP = {VMCI_HOST_CONTEXT_ID, VSC_PUBLIC_GROUP_RID};

int vsc_acl_kind_parse(const char *name, size_t len)
{
    int k;

    for (k = 0; k < VSC_NKINDS; k++)
        if (strlen(KIND_NAMES[k]) == len && memcmp(KIND_NAMES[k], name, len) == 0)
            return k;
    return VSC_KIND_NONE;
}

const char *vsc_acl_kind_name(int kind)
{
    return kind >= 0 && kind < VSC_NKINDS ? KIND_NAMES[kind] : NULL;
}

int vsc_acl_valid_for(int kind, int priv)
{
    return kind >= 0 && kind < VSC_NKINDS && priv >= 0 && priv < VMCI_NUM_PRIVILEGES && (VALID[kind] >> priv & 1u);
}

static int handle_cmp(vsc_handle a, vsc_handle b)
{
    if (a.context != b.context)
        return a.context < b.context ? -1 : 1;
    return a.resource < b.resource ? -1 : a.resource > b.resource;
}

static int same(vsc_handle a, vsc_handle b)
{
    return a.context == b.context && a.resource == b.resource;
}

/* Text: lines split at '\n' only ("\r\n" too), fields at spaces and tabs, nothing else but printable
 * ASCII. Stricter than Python's str.splitlines()/split(): what C accepts, Python reads the same. */

typedef struct {
    const char *p, *end;
} cursor;

typedef struct {
    const char *s[MAX_TOKENS];
    size_t len[MAX_TOKENS];
    int n;
} tokens;

/* The next line's tokens: 1, 0 at the end of the text, -1 if the line is malformed. */
static int next_line(cursor *c, tokens *out)
{
    const char *line = c->p, *stop;

    if (c->p >= c->end)
        return 0;
    stop = memchr(c->p, '\n', (size_t)(c->end - c->p));
    if (stop == NULL)
        stop = c->end;
    c->p = stop < c->end ? stop + 1 : stop;
    if (stop > line && stop[-1] == '\r')
        stop--;
    out->n = 0;
    while (line < stop) {
        const char *tok;

        if (*line == ' ' || *line == '\t') {
            line++;
            continue;
        }
        tok = line;
        while (line < stop && *line != ' ' && *line != '\t') {
            if (*line < 0x21 || *line > 0x7e)
                return -1;
            line++;
        }
        if (out->n == MAX_TOKENS)
            return -1;
        out->s[out->n] = tok;
        out->len[out->n++] = (size_t)(line - tok);
    }
    return out->n > 0 ? 1 : -1;
}

static int tok_is(const tokens *t, int i, const char *word)
{
    return t->len[i] == strlen(word) && memcmp(t->s[i], word, t->len[i]) == 0;
}

/* Decimal digits only, at most max. 0 or -1. */
static int tok_u64(const tokens *t, int i, uint64_t max, uint64_t *out)
{
    uint64_t v = 0;
    size_t k;

    if (t->len[i] == 0 || t->len[i] > 40)
        return -1;
    for (k = 0; k < t->len[i]; k++) {
        unsigned d = (unsigned)(t->s[i][k] - '0');
        if (d > 9 || d > max || v > (max - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* Privileges */

typedef struct {
    vsc_handle client;
    int priv, state;
    size_t seq;
} record;

static int record_cmp(const void *a, const void *b)
{
    const record *x = a, *y = b;
    int c = handle_cmp(x->client, y->client);

    return c != 0 ? c : (x->seq > y->seq) - (x->seq < y->seq);
}

int vsc_acl_parse(const char *text, size_t len, vsc_acl *out)
{
    cursor c = {text, text + len};
    record *recs = NULL;
    size_t nrecs = 0, cap = 0, i;
    tokens t;
    int rc, kind;

    memset(out, 0, sizeof *out);
    if (len > VSC_ACL_FILE_MAX || next_line(&c, &t) != 1 || t.n != 3 || !tok_is(&t, 0, ACL_MAGIC)
        || !tok_is(&t, 1, "1") || (kind = vsc_acl_kind_parse(t.s[2], t.len[2])) == VSC_KIND_NONE)
        return -1;
    while ((rc = next_line(&c, &t)) == 1) {
        uint64_t cid, rid, priv;
        int state;

        if (t.n != 4 || tok_u64(&t, 0, 0xFFFFFFFFu, &cid) != 0 || tok_u64(&t, 1, 0xFFFFFFFFu, &rid) != 0
            || tok_u64(&t, 2, VMCI_NUM_PRIVILEGES - 1, &priv) != 0)
            break;
        if (tok_is(&t, 3, "allow"))
            state = VMCI_PRIV_ALLOW;
        else if (tok_is(&t, 3, "deny"))
            state = VMCI_PRIV_DENY;
        else
            break;
        if (nrecs == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            record *grown = realloc(recs, ncap * sizeof *grown);
            if (grown == NULL)
                break;
            recs = grown;
            cap = ncap;
        }
        recs[nrecs].client.context = (uint32_t)cid;
        recs[nrecs].client.resource = (uint32_t)rid;
        recs[nrecs].priv = (int)priv;
        recs[nrecs].state = state;
        recs[nrecs].seq = nrecs;
        nrecs++;
    }
    if (rc != 0) {
        free(recs);
        return -1;
    }
    out->kind = kind;
    if (nrecs > 0) {
        /* Sorted by client then line, a later line for the same privilege wins, as in Python. */
        qsort(recs, nrecs, sizeof *recs, record_cmp);
        out->entries = calloc(nrecs, sizeof *out->entries);
        if (out->entries == NULL) {
            free(recs);
            return -1;
        }
        for (i = 0; i < nrecs; i++) {
            if (out->n == 0 || !same(out->entries[out->n - 1].client, recs[i].client))
                out->entries[out->n++].client = recs[i].client;
            out->entries[out->n - 1].state[recs[i].priv] = recs[i].state;
        }
    }
    free(recs);
    return 0;
}

char *vsc_acl_format(const vsc_acl *acl, size_t *len)
{
    /* Each line at most "4294967295 4294967295 6 allow\n". */
    size_t cap = 64 + (size_t)acl->n * VMCI_NUM_PRIVILEGES * 32, n;
    char *text = malloc(cap);
    int i, p;

    if (text == NULL || vsc_acl_kind_name(acl->kind) == NULL) {
        free(text);
        return NULL;
    }
    n = (size_t)snprintf(text, cap, "%s 1 %s\n", ACL_MAGIC, vsc_acl_kind_name(acl->kind));
    for (i = 0; i < acl->n; i++)
        for (p = 0; p < VMCI_NUM_PRIVILEGES; p++)
            if (acl->entries[i].state[p] != 0)
                n += (size_t)snprintf(text + n, cap - n, "%u %u %d %s\n", (unsigned)acl->entries[i].client.context,
                                      (unsigned)acl->entries[i].client.resource, p,
                                      acl->entries[i].state[p] == VMCI_PRIV_ALLOW ? "allow" : "deny");
    *len = n;
    return text;
}

void vsc_acl_free(vsc_acl *acl)
{
    free(acl->entries);
    acl->entries = NULL;
    acl->n = 0;
}

int vsc_acl_fail_closed(vsc_acl *out)
{
    memset(out, 0, sizeof *out);
    out->kind = VSC_KIND_DATAGRAM;
    if (vsc_acl_set(out, PUBLIC_GROUP, VMCI_PRIV_DG_SEND, VMCI_PRIV_DENY) != 0
        || vsc_acl_set(out, PUBLIC_GROUP, VMCI_PRIV_SM_ATTACH, VMCI_PRIV_DENY) != 0) {
        vsc_acl_free(out);
        return -1;
    }
    return 0;
}

/* Index of client's entry, or -(insertion point) - 1. */
static int find_entry(const vsc_acl *acl, vsc_handle client)
{
    int lo = 0, hi = acl->n;

    while (lo < hi) {
        int mid = lo + (hi - lo) / 2, c = handle_cmp(acl->entries[mid].client, client);
        if (c == 0)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -lo - 1;
}

int vsc_acl_own_state(const vsc_acl *acl, vsc_handle client, int priv)
{
    int i;

    if (acl == NULL || priv < 0 || priv >= VMCI_NUM_PRIVILEGES || (i = find_entry(acl, client)) < 0)
        return 0;
    return acl->entries[i].state[priv];
}

int vsc_acl_set(vsc_acl *acl, vsc_handle client, int priv, int state)
{
    int i = find_entry(acl, client), p;

    if (priv < 0 || priv >= VMCI_NUM_PRIVILEGES)
        return -1;
    if (i < 0) {
        vsc_acl_entry *grown;

        if (state == 0)
            return 0;
        i = -i - 1;
        grown = realloc(acl->entries, (size_t)(acl->n + 1) * sizeof *grown);
        if (grown == NULL)
            return -1;
        acl->entries = grown;
        memmove(&grown[i + 1], &grown[i], (size_t)(acl->n - i) * sizeof *grown);
        memset(&grown[i], 0, sizeof *grown);
        grown[i].client = client;
        acl->n++;
    }
    acl->entries[i].state[priv] = state;
    for (p = 0; p < VMCI_NUM_PRIVILEGES; p++)
        if (acl->entries[i].state[p] != 0)
            return 0;
    memmove(&acl->entries[i], &acl->entries[i + 1], (size_t)(acl->n - i - 1) * sizeof *acl->entries);
    acl->n--;
    return 0;
}

static int answer(int state)
{
    return state == VMCI_PRIV_ALLOW ? VMCI_SUCCESS_ACCESS_GRANTED : VMCI_ERROR_NO_ACCESS;
}

int vsc_acl_check(const vsc_acl *acl, vsc_handle resource, vsc_handle client, int priv,
                  vsc_acl_member_fn member, void *arg)
{
    vsc_handle context = {client.context, 0};
    int i, state;

    if ((priv == VMCI_PRIV_CH_PRIV || priv == VMCI_PRIV_DESTROY_RESOURCE) && client.context == resource.context)
        return VMCI_SUCCESS_ACCESS_GRANTED;
    if (acl == NULL || priv < 0 || priv >= VMCI_NUM_PRIVILEGES)
        return VMCI_ERROR_INVALID_PRIV;
    if ((state = vsc_acl_own_state(acl, client, priv)) != 0)
        return answer(state);
    if (client.resource != 0 && (state = vsc_acl_own_state(acl, context, priv)) != 0)
        return answer(state);
    /* Groups live in the host context: the entries there, in handle order, public group last. */
    for (i = 0; member != NULL && i < acl->n; i++) {
        const vsc_acl_entry *e = &acl->entries[i];

        if (e->client.context != VMCI_HOST_CONTEXT_ID || e->state[priv] == 0 || same(e->client, PUBLIC_GROUP))
            continue;
        if (member(arg, e->client, client))
            return answer(e->state[priv]);
    }
    if ((state = vsc_acl_own_state(acl, PUBLIC_GROUP, priv)) != 0)
        return answer(state);
    return VMCI_ERROR_INVALID_PRIV;
}

/* Groups */

int vsc_group_parse(const char *text, size_t len, vsc_group *out)
{
    cursor c = {text, text + len};
    tokens t;
    uint64_t cid, pid, start;
    int rc, cap = 0;

    memset(out, 0, sizeof *out);
    if (len > VSC_ACL_FILE_MAX || next_line(&c, &t) != 1 || t.n != 5 || !tok_is(&t, 0, GROUP_MAGIC)
        || !tok_is(&t, 1, "1") || tok_u64(&t, 2, 0xFFFFFFFFu, &cid) != 0 || tok_u64(&t, 3, UINT64_MAX, &pid) != 0
        || tok_u64(&t, 4, UINT64_MAX, &start) != 0)
        return -1;
    out->owner_cid = (uint32_t)cid;
    out->owner_pid = pid;
    out->owner_start = start;
    while ((rc = next_line(&c, &t)) == 1) {
        uint64_t mcid, mrid, can;

        if (t.n != 3 || tok_u64(&t, 0, 0xFFFFFFFFu, &mcid) != 0 || tok_u64(&t, 1, 0xFFFFFFFFu, &mrid) != 0
            || tok_u64(&t, 2, UINT64_MAX, &can) != 0)
            break;
        if (out->n == cap) {
            int ncap = cap ? cap * 2 : 8;
            vsc_group_member *grown = realloc(out->members, (size_t)ncap * sizeof *grown);
            if (grown == NULL)
                break;
            out->members = grown;
            cap = ncap;
        }
        out->members[out->n].member.context = (uint32_t)mcid;
        out->members[out->n].member.resource = (uint32_t)mrid;
        out->members[out->n].can_assign = can != 0;
        out->n++;
    }
    if (rc != 0) {
        vsc_group_free(out);
        return -1;
    }
    return 0;
}

void vsc_group_free(vsc_group *g)
{
    free(g->members);
    g->members = NULL;
    g->n = 0;
}

int vsc_group_has(const vsc_group *g, vsc_handle h)
{
    vsc_handle context = {h.context, 0};
    int i;

    for (i = 0; i < g->n; i++)
        if (same(g->members[i].member, h) || same(g->members[i].member, context))
            return 1;
    return 0;
}

/* Storage */

static void resource_path(const vsc_local *t, vsc_handle h, const char *suffix, char *out, size_t size)
{
    snprintf(out, size, "%s/c%u/%u%s", t->rundir, (unsigned)h.context, (unsigned)h.resource, suffix);
}

/* The whole file, malloc'ed: 0; -1 with errno (EFBIG: longer than VSC_ACL_FILE_MAX). */
static int read_file(const char *path, char **text, size_t *len)
{
    struct stat st;
    size_t got = 0;
    char *buf;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);

    if (fd < 0)
        return -1;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > VSC_ACL_FILE_MAX) {
        close(fd);
        errno = EFBIG;
        return -1;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL) {
        close(fd);
        errno = ENOMEM;
        return -1;
    }
    for (;;) {
        ssize_t n = read(fd, buf + got, (size_t)st.st_size + 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            errno = e;
            return -1;
        }
        if (n == 0)
            break;
        got += (size_t)n;
        if (got > (size_t)VSC_ACL_FILE_MAX) { /* grew meanwhile */
            free(buf);
            close(fd);
            errno = EFBIG;
            return -1;
        }
        if (got == (size_t)st.st_size + 1) {
            char *grown = realloc(buf, got * 2);
            if (grown == NULL) {
                free(buf);
                close(fd);
                errno = ENOMEM;
                return -1;
            }
            buf = grown;
            st.st_size = (off_t)(got * 2 - 1);
        }
    }
    close(fd);
    *text = buf;
    *len = got;
    return 0;
}

int vsc_acl_load(const vsc_local *t, vsc_handle resource, vsc_acl *acl)
{
    char path[PATH_BUF], *text;
    size_t len;
    int rc;

    if (vsc_links_streamed(t))
        return vsc_acl_memory_load(resource, acl);
    memset(acl, 0, sizeof *acl);
    resource_path(t, resource, ".acl", path, sizeof path);
    if (read_file(path, &text, &len) != 0) {
        if (errno == ENOENT || errno == ENOMEM)
            return 0;
        return vsc_acl_fail_closed(acl) == 0;
    }
    rc = vsc_acl_parse(text, len, acl);
    free(text);
    if (rc != 0)
        return vsc_acl_fail_closed(acl) == 0;
    return 1;
}

static int process_alive(uint64_t pid, uint64_t start)
{
    uint64_t ticks;

    if (pid == 0 || pid > 0x7FFFFFFF)
        return 0;
    ticks = vsc_local_start_ticks((pid_t)pid);
    return ticks != 0 && ticks == start;
}

/* The live group at h: 0 with *g filled, or -1 (none, dead or malformed). */
static int load_group(const vsc_local *t, vsc_handle h, vsc_group *g)
{
    char path[PATH_BUF], *text;
    size_t len;
    int rc;

    resource_path(t, h, ".group", path, sizeof path);
    if (read_file(path, &text, &len) != 0)
        return -1;
    rc = vsc_group_parse(text, len, g);
    free(text);
    if (rc == 0 && !process_alive(g->owner_pid, g->owner_start)) {
        vsc_group_free(g);
        rc = -1;
    }
    return rc;
}

static int stored_member(void *arg, vsc_handle group, vsc_handle member)
{
    vsc_group g;
    int has;

    if (load_group(arg, group, &g) != 0)
        return 0;
    has = vsc_group_has(&g, member);
    vsc_group_free(&g);
    return has;
}

int vsc_acl_check_stored(const vsc_local *t, const vsc_acl *acl, vsc_handle resource, vsc_handle client, int priv)
{
    return vsc_acl_check(acl, resource, client, priv, stored_member, (void *)t);
}

static int permits(const vsc_local *t, vsc_handle resource, vsc_handle client, int priv)
{
    vsc_acl acl;
    int ok = 1;

    if (vsc_policy_denies(t->policy, client.context, resource.context))
        return 0;
    if (vsc_acl_load(t, resource, &acl)) {
        ok = vsc_acl_check_stored(t, &acl, resource, client, priv) != VMCI_ERROR_NO_ACCESS;
        vsc_acl_free(&acl);
    }
    return ok;
}

int vsc_acl_may_send(const vsc_local *t, vsc_handle src, vsc_handle dst)
{
    return permits(t, dst, src, VMCI_PRIV_DG_SEND);
}

int vsc_acl_sender_allowed(const vsc_local *t, const vsc_acl *acl, vsc_handle src, vsc_handle dst)
{
    if (vsc_policy_denies(t->policy, src.context, dst.context))
        return 0;
    return acl == NULL || vsc_acl_check_stored(t, acl, dst, src, VMCI_PRIV_DG_SEND) != VMCI_ERROR_NO_ACCESS;
}

int vsc_acl_may_attach(const vsc_local *t, uint32_t cid, vsc_handle region)
{
    vsc_handle client = {cid, 0};

    return permits(t, region, client, VMCI_PRIV_SM_ATTACH);
}

static int lexists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* A queue pair lives while one of its ends holds the flock of <marker>.0 or <marker>.1. */
static int queue_pair_alive(const char *marker)
{
    static const char *const ends[2] = {".0", ".1"};
    char path[PATH_BUF + 8];
    int end;

    for (end = 0; end < 2; end++) {
        int fd, held;

        snprintf(path, sizeof path, "%s%s", marker, ends[end]);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        held = flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
        close(fd);
        if (held)
            return 1;
    }
    return 0;
}

int vsc_acl_kind_of(const vsc_local *t, vsc_handle resource)
{
    char path[PATH_BUF];
    vsc_group g;

    if (same(resource, PUBLIC_GROUP))
        return VSC_KIND_GROUP;
    if (load_group(t, resource, &g) == 0) {
        vsc_group_free(&g);
        return VSC_KIND_GROUP;
    }
    if (vsc_local_endpoint_alive(t, resource))
        return VSC_KIND_DATAGRAM;
    resource_path(t, resource, ".shm", path, sizeof path);
    if (lexists(path) && vsc_local_marker_alive(t, path))
        return VSC_KIND_SHAREDMEM;
    resource_path(t, resource, ".mir", path, sizeof path); /* a mirrored region (vsc_mirror.h) */
    if (lexists(path) && vsc_local_marker_alive(t, path))
        return VSC_KIND_SHAREDMEM;
    resource_path(t, resource, ".qp", path, sizeof path);
    if (lexists(path) && queue_pair_alive(path))
        return VSC_KIND_QUEUEPAIR;
    return VSC_KIND_NONE;
}

/* Changing privileges */

static int errno_code(int e)
{
    return e == EACCES || e == EPERM || e == EROFS ? VMCI_ERROR_NO_ACCESS : VMCI_ERROR_GENERIC;
}

static int lock_context(const vsc_local *t, uint32_t cid, int *lock_fd)
{
    char path[PATH_BUF];
    int fd, rc;

    snprintf(path, sizeof path, "%s/c%u/.lock", t->rundir, (unsigned)cid);
    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return errno == ENOENT ? VMCI_ERROR_INVALID_ARGS : errno_code(errno);
    while ((rc = flock(fd, LOCK_EX)) != 0 && errno == EINTR)
        ;
    if (rc != 0) {
        close(fd);
        return VMCI_ERROR_GENERIC;
    }
    *lock_fd = fd;
    return VMCI_SUCCESS;
}

/* Replace path's contents (temporary file, then rename). A VMCI code. */
static int write_file(const char *path, const char *text, size_t len)
{
    char tmp[PATH_BUF + 32];
    size_t done = 0;
    int fd, e;

    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return errno_code(errno);
    while (done < len) {
        ssize_t n = write(fd, text + done, len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            e = n < 0 ? errno : ENOSPC;
            close(fd);
            unlink(tmp);
            return errno_code(e);
        }
        done += (size_t)n;
    }
    if (close(fd) != 0 || rename(tmp, path) != 0) {
        e = errno;
        unlink(tmp);
        return errno_code(e);
    }
    return VMCI_SUCCESS;
}

static int store(const vsc_local *t, vsc_handle resource, const vsc_acl *acl)
{
    char path[PATH_BUF], *text;
    size_t len;
    int rc;

    resource_path(t, resource, ".acl", path, sizeof path);
    if (acl->n == 0)
        return unlink(path) == 0 || errno == ENOENT ? VMCI_SUCCESS : errno_code(errno);
    text = vsc_acl_format(acl, &len);
    if (text == NULL)
        return VMCI_ERROR_NO_MEM;
    rc = write_file(path, text, len);
    free(text);
    return rc;
}

/* Tell the endpoint's receiver and senders (they compare the word before each delivery/send). */
static void bump_epoch(const vsc_local *t, vsc_handle resource)
{
    char path[PATH_BUF];
    struct stat st;
    uint8_t *page;
    int fd;

    resource_path(t, resource, ".acct", path, sizeof path);
    fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return;
    if (fstat(fd, &st) == 0 && st.st_size >= VSC_ACCT_SIZE) {
        page = mmap(NULL, VSC_ACCT_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (page != MAP_FAILED) {
            __atomic_fetch_add((uint64_t *)(page + VSC_ACCT_OFF_ACL_EPOCH), 1, __ATOMIC_ACQ_REL);
            munmap(page, VSC_ACCT_SIZE);
        }
    }
    close(fd);
}

/* privileges.parse_privileges: INVALID_ARGS for a bad count or array, INVALID_PRIV for a number
 * that names no privilege. */
static int check_list(int n, const int *privs)
{
    int i;

    if (n < 0 || (n > 0 && privs == NULL))
        return VMCI_ERROR_INVALID_ARGS;
    for (i = 0; i < n; i++)
        if (privs[i] < 0 || privs[i] >= VMCI_NUM_PRIVILEGES)
            return VMCI_ERROR_INVALID_PRIV;
    return VMCI_SUCCESS;
}

static int edit(vsc_acl *acl, vsc_handle client, int nallow, const int *allow, int ndeny, const int *deny)
{
    int i, rc;

    if ((rc = check_list(nallow, allow)) != VMCI_SUCCESS || (rc = check_list(ndeny, deny)) != VMCI_SUCCESS)
        return rc;
    if (nallow == 0 && ndeny == 0)
        return VMCI_ERROR_INVALID_ARGS;
    for (i = 0; i < nallow; i++)
        if (!vsc_acl_valid_for(acl->kind, allow[i]))
            return VMCI_ERROR_INVALID_PRIV;
    for (i = 0; i < ndeny; i++)
        if (!vsc_acl_valid_for(acl->kind, deny[i]))
            return VMCI_ERROR_INVALID_PRIV;
    for (i = 0; i < nallow; i++)
        if (vsc_acl_set(acl, client, allow[i], VMCI_PRIV_ALLOW) != 0)
            return VMCI_ERROR_NO_MEM;
    for (i = 0; i < ndeny; i++) /* after the allows: deny wins */
        if (vsc_acl_set(acl, client, deny[i], VMCI_PRIV_DENY) != 0)
            return VMCI_ERROR_NO_MEM;
    return VMCI_SUCCESS;
}

int vsc_acl_add(const vsc_local *t, vsc_handle resource, vsc_handle client, int nallow, const int *allow,
                int ndeny, const int *deny)
{
    vsc_handle self = {t->cid, 0};
    vsc_acl acl;
    int vsock = vsc_links_streamed(t), lock_fd = -1, rc;
    int kind = vsock ? vsc_acl_memory_kind(resource) : vsc_acl_kind_of(t, resource);

    if (kind == VSC_KIND_NONE)
        return VMCI_ERROR_INVALID_ARGS;
    if (vsock)
        vsc_acl_memory_lock();
    else if ((rc = lock_context(t, resource.context, &lock_fd)) != VMCI_SUCCESS)
        return rc;
    if (!vsc_acl_load(t, resource, &acl) || acl.kind != kind) {
        vsc_acl_free(&acl); /* a stale file of a dead resource that held this id */
        memset(&acl, 0, sizeof acl);
        acl.kind = kind;
    }
    if (vsc_acl_check_stored(t, &acl, resource, self, VMCI_PRIV_CH_PRIV) != VMCI_SUCCESS_ACCESS_GRANTED)
        rc = VMCI_ERROR_NO_ACCESS;
    else if ((rc = edit(&acl, client, nallow, allow, ndeny, deny)) != VMCI_SUCCESS)
        ;
    else if (vsock)
        rc = vsc_acl_memory_store(resource, &acl); /* bumps the epoch */
    else if ((rc = store(t, resource, &acl)) == VMCI_SUCCESS && kind == VSC_KIND_DATAGRAM)
        bump_epoch(t, resource);
    vsc_acl_free(&acl);
    if (vsock)
        vsc_acl_memory_unlock();
    else
        close(lock_fd);
    return rc;
}

/* Groups hold ids of the host context while their creator lives (vsc_local_add_kind). */
static int group_alive(const vsc_local *t, const char *path)
{
    char *text;
    size_t len;
    vsc_group g;
    int alive;

    (void)t;
    if (read_file(path, &text, &len) != 0)
        return errno != ENOENT && errno != EFBIG; /* never reclaim what cannot be probed */
    if (vsc_group_parse(text, len, &g) != 0) {
        free(text);
        return 0;
    }
    free(text);
    alive = process_alive(g.owner_pid, g.owner_start);
    vsc_group_free(&g);
    return alive;
}

__attribute__((constructor)) static void vsc_acl_load_kinds(void)
{
    vsc_local_add_kind(".group", group_alive, NULL);
}
