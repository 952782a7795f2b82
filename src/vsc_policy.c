/* vsockcompat C core: the access policy file, the subset of vsc_policy.h (vsockcompat/policy.py). */
#define _GNU_SOURCE
#include "vsc_policy.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vsc_constants.h"

#define POLICY_FILE_MAX (1 << 20)
#define PATH_BUF 4096

enum { TOP, DISCOVERY, CONTEXTS, CONTEXT };

typedef struct {
    const char *p, *end;
} span;

typedef struct {
    vsc_policy *out;
    int section, ctx, seen_discovery, seen_contexts, seen_register, seen_flags, seen_uid;
    const char *why;
} parser;

static int is_bare(char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

static void skip_ws(span *s)
{
    while (s->p < s->end && (*s->p == ' ' || *s->p == '\t' || *s->p == '\r'))
        s->p++;
}

static int eat(span *s, char c)
{
    skip_ws(s);
    if (s->p < s->end && *s->p == c) {
        s->p++;
        return 1;
    }
    return 0;
}

/* Nothing but blanks and a comment left. */
static int at_end(span *s)
{
    skip_ws(s);
    return s->p == s->end || *s->p == '#';
}

/* A bare key or a "basic string" / 'literal string' without escapes: its text in *k. */
static int key_or_string(span *s, span *k, int bare_ok)
{
    skip_ws(s);
    if (s->p < s->end && (*s->p == '"' || *s->p == '\'')) {
        char q = *s->p++;
        k->p = s->p;
        while (s->p < s->end && *s->p != q) {
            if (*s->p == '\\' || (unsigned char)*s->p < 0x20 || *s->p == 0x7f)
                return -1;
            s->p++;
        }
        if (s->p == s->end)
            return -1;
        k->end = s->p++;
        return 0;
    }
    if (!bare_ok)
        return -1;
    k->p = s->p;
    while (s->p < s->end && is_bare(*s->p))
        s->p++;
    k->end = s->p;
    return k->p < k->end ? 0 : -1;
}

static int is(const span *k, const char *word)
{
    return (size_t)(k->end - k->p) == strlen(word) && memcmp(k->p, word, strlen(word)) == 0;
}

/* policy._CID: 0 or [1-9][0-9]{0,9}, below VMCI_INVALID_ID. */
static int parse_cid(const span *k, uint32_t *cid)
{
    uint64_t v = 0;
    const char *p;

    if (k->p == k->end || k->end - k->p > 10 || (k->p[0] == '0' && k->end - k->p > 1))
        return -1;
    for (p = k->p; p < k->end; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (uint64_t)(*p - '0');
    }
    if (v >= VMCI_INVALID_ID)
        return -1;
    *cid = (uint32_t)v;
    return 0;
}

static int fail(parser *ps, const char *why)
{
    ps->why = why;
    return -1;
}

static int header(parser *ps, span *s)
{
    span parts[3];
    int n = 0, i;
    uint32_t cid;

    s->p++; /* '[' */
    if (s->p < s->end && *s->p == '[')
        return fail(ps, "arrays of tables are not part of the policy");
    do {
        if (n == 3 || key_or_string(s, &parts[n++], 1) != 0)
            return fail(ps, "a malformed table header");
    } while (eat(s, '.'));
    if (!eat(s, ']') || !at_end(s))
        return fail(ps, "a malformed table header");
    if (n == 1 && is(&parts[0], "discovery")) {
        if (ps->seen_discovery++)
            return fail(ps, "[discovery] appears twice");
        ps->section = DISCOVERY;
        return 0;
    }
    if (!is(&parts[0], "contexts") || n == 3)
        return fail(ps, "unknown section (expected [discovery] or [contexts.<cid>])");
    if (n == 1) {
        if (ps->seen_contexts++)
            return fail(ps, "[contexts] appears twice");
        ps->section = CONTEXTS;
        return 0;
    }
    if (parse_cid(&parts[1], &cid) != 0)
        return fail(ps, "a context id is a number in 0..4294967294");
    for (i = 0; i < ps->out->n; i++)
        if (ps->out->contexts[i].cid == cid)
            return fail(ps, "a context appears twice");
    {
        vsc_policy_context *grown = realloc(ps->out->contexts, (size_t)(ps->out->n + 1) * sizeof *grown);
        if (grown == NULL)
            return fail(ps, "out of memory");
        ps->out->contexts = grown;
        memset(&grown[ps->out->n], 0, sizeof *grown);
        grown[ps->out->n].cid = cid;
        ps->ctx = ps->out->n++;
    }
    ps->section = CONTEXT;
    ps->seen_flags = ps->seen_uid = 0;
    return 0;
}

/* flags = [...]: the array's text, maybe over several lines (s spans the rest of the text). */
static int flags_value(parser *ps, span *s, int *line)
{
    int flags = 0;

    if (!eat(s, '['))
        return fail(ps, "flags must be a list of strings");
    for (;;) {
        span k;

        /* Blanks, newlines and comments may stand between the elements of an array. */
        for (;;) {
            skip_ws(s);
            if (s->p < s->end && *s->p == '#')
                while (s->p < s->end && *s->p != '\n')
                    s->p++;
            if (s->p < s->end && (*s->p == '\n' || *s->p == '\r')) {
                if (*s->p == '\n')
                    (*line)++;
                s->p++;
                continue;
            }
            break;
        }
        if (eat(s, ']'))
            break;
        if (key_or_string(s, &k, 0) != 0)
            return fail(ps, "flags must be a list of strings");
        if (is(&k, "restricted"))
            flags |= VMCI_PRIVILEGE_FLAG_RESTRICTED;
        else if (is(&k, "trusted"))
            flags |= VMCI_PRIVILEGE_FLAG_TRUSTED;
        else
            return fail(ps, "unknown flag (expected 'restricted', 'trusted')");
        skip_ws(s);
        if (s->p < s->end && *s->p == ',') {
            s->p++;
            continue;
        }
        /* No comma: only blanks or comments up to the closing bracket. */
        for (;;) {
            skip_ws(s);
            if (s->p < s->end && *s->p == '#')
                while (s->p < s->end && *s->p != '\n')
                    s->p++;
            if (s->p < s->end && (*s->p == '\n' || *s->p == '\r')) {
                if (*s->p == '\n')
                    (*line)++;
                s->p++;
                continue;
            }
            break;
        }
        if (!eat(s, ']'))
            return fail(ps, "flags must be a list of strings");
        break;
    }
    ps->out->contexts[ps->ctx].flags = flags;
    return 0;
}

static int uid_value(parser *ps, span *s)
{
    uint64_t v = 0;
    const char *start;

    skip_ws(s);
    start = s->p;
    while (s->p < s->end && *s->p >= '0' && *s->p <= '9') {
        v = v * 10 + (uint64_t)(*s->p - '0');
        if (v > 0xFFFFFFFFu)
            return fail(ps, "uid must be a user id (an integer >= 0)");
        s->p++;
    }
    if (s->p == start || (*start == '0' && s->p - start > 1))
        return fail(ps, "uid must be a user id (an integer >= 0)");
    ps->out->contexts[ps->ctx].has_uid = 1;
    ps->out->contexts[ps->ctx].uid = (uint32_t)v;
    return 0;
}

/* One key = value; s spans from the key to the end of the text (arrays may continue). */
static int key_value(parser *ps, span *s, int *line)
{
    span key, value;

    if (key_or_string(s, &key, 1) != 0 || eat(s, '.'))
        return fail(ps, "a malformed key (dotted keys are not part of the policy)");
    if (!eat(s, '='))
        return fail(ps, "expected key = value");
    switch (ps->section) {
    case DISCOVERY:
        if (!is(&key, "register"))
            return fail(ps, "unknown key in [discovery]");
        if (ps->seen_register++)
            return fail(ps, "register appears twice");
        if (key_or_string(s, &value, 0) != 0 || !(is(&value, "permissive") || is(&value, "trusted")))
            return fail(ps, "register must be one of 'permissive', 'trusted'");
        return 0;
    case CONTEXT:
        if (is(&key, "flags")) {
            if (ps->seen_flags++)
                return fail(ps, "flags appears twice");
            return flags_value(ps, s, line);
        }
        if (is(&key, "uid")) {
            if (ps->seen_uid++)
                return fail(ps, "uid appears twice");
            return uid_value(ps, s);
        }
        return fail(ps, "unknown key (expected flags, uid)");
    case CONTEXTS:
        return fail(ps, "[contexts] must hold tables [contexts.<cid>]");
    default:
        return fail(ps, "unknown section (expected [discovery] or [contexts.<cid>])");
    }
}

int vsc_policy_parse(const char *text, size_t len, vsc_policy *out, int *line, const char **why)
{
    parser ps;
    const char *p = text, *end = text + len;
    size_t i;

    memset(out, 0, sizeof *out);
    memset(&ps, 0, sizeof ps);
    ps.out = out;
    *line = 1;
    for (i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r') || c == 0x7f) {
            *why = "a control character";
            goto bad;
        }
        if (c == '\n')
            (*line)++;
    }
    *line = 1;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        span s = {p, end};
        int rc = 0;

        if (eol == NULL)
            eol = end;
        skip_ws(&s);
        if (s.p < eol && *s.p != '#' && *s.p != '\r' && *s.p != '\n') {
            if (*s.p == '[') {
                s.end = eol;
                rc = header(&ps, &s);
            } else {
                rc = key_value(&ps, &s, line);
                if (rc == 0) {
                    eol = memchr(s.p, '\n', (size_t)(end - s.p));
                    if (eol == NULL)
                        eol = end;
                    s.end = eol;
                    if (!at_end(&s))
                        rc = fail(&ps, "unexpected text after the value");
                }
            }
        } else {
            s.end = eol;
        }
        if (rc != 0) {
            *why = ps.why;
            goto bad;
        }
        /* Comments may hold any UTF-8; the rest must be ASCII. */
        for (s.p = p; s.p < eol && *s.p != '#'; s.p++)
            if ((unsigned char)*s.p >= 0x80) {
                *why = "non-ASCII text outside a comment";
                goto bad;
            }
        p = eol < end ? eol + 1 : end;
        (*line)++;
    }
    return 0;
bad:
    vsc_policy_free(out);
    return -1;
}

void vsc_policy_free(vsc_policy *p)
{
    free(p->contexts);
    p->contexts = NULL;
    p->n = 0;
}

int vsc_policy_load(const char *rundir, vsc_policy *out, char *err, size_t err_size)
{
    const char *configured = getenv("VSOCKCOMPAT_POLICY");
    char path[PATH_BUF], *text;
    const char *why;
    struct stat st;
    ssize_t n;
    int fd, line;

    memset(out, 0, sizeof *out);
    if (configured != NULL && configured[0] != '\0') {
        snprintf(path, sizeof path, "%s", configured);
    } else {
        snprintf(path, sizeof path, "%s/policy.toml", rundir);
        if (stat(path, &st) != 0 || !S_ISREG(st.st_mode))
            return 0;
    }
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size > POLICY_FILE_MAX) {
        snprintf(err, err_size, "%s: cannot read the policy file: %s", path,
                 fd < 0 ? strerror(errno) : "too large");
        if (fd >= 0)
            close(fd);
        return -1;
    }
    text = malloc((size_t)st.st_size + 1);
    n = text == NULL ? -1 : read(fd, text, (size_t)st.st_size + 1);
    close(fd);
    if (n < 0 || n > st.st_size) {
        snprintf(err, err_size, "%s: cannot read the policy file", path);
        free(text);
        return -1;
    }
    if (vsc_policy_parse(text, (size_t)n, out, &line, &why) != 0) {
        snprintf(err, err_size, "%s:%d: %s", path, line, why);
        free(text);
        return -1;
    }
    free(text);
    return 0;
}

int vsc_policy_flags(const vsc_policy *p, uint32_t cid)
{
    int i;

    for (i = 0; p != NULL && i < p->n; i++)
        if (p->contexts[i].cid == cid)
            return p->contexts[i].flags;
    if (cid == VMCI_HYPERVISOR_CONTEXT_ID)
        return VMCI_MAX_PRIVILEGE_FLAGS;
    if (cid == VMCI_WELL_KNOWN_CONTEXT_ID)
        return VMCI_PRIVILEGE_FLAG_TRUSTED;
    return VMCI_DEFAULT_PROC_PRIVILEGE_FLAGS;
}

int vsc_policy_denies(const vsc_policy *p, uint32_t a, uint32_t b)
{
    int fa = vsc_policy_flags(p, a), fb = vsc_policy_flags(p, b);

    return ((fa & VMCI_PRIVILEGE_FLAG_RESTRICTED) && !(fb & VMCI_PRIVILEGE_FLAG_TRUSTED))
           || ((fb & VMCI_PRIVILEGE_FLAG_RESTRICTED) && !(fa & VMCI_PRIVILEGE_FLAG_TRUSTED));
}

int vsc_policy_uid(const vsc_policy *p, uint32_t cid, uint32_t *uid)
{
    int i;

    for (i = 0; p != NULL && i < p->n; i++)
        if (p->contexts[i].cid == cid && p->contexts[i].has_uid) {
            *uid = p->contexts[i].uid;
            return 1;
        }
    return 0;
}
