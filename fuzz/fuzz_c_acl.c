/*
 * libFuzzer target for the C core's readers of the access-control files
 * (src/vsc_acl.c, src/vsc_policy.c): any bytes as a privileges file, a group file
 * and a policy file (whose error must name a line of the input). A parsed
 * privileges file must be sorted and unique, format to text that parses back to
 * the same privileges, and answer every check with one of the three codes.
 * Built with -fsanitize=fuzzer,address,undefined by fuzz/c_acl.py.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vsc_acl.h"
#include "vsc_policy.h"

static int member_of_odd(void *arg, vsc_handle group, vsc_handle member)
{
    (void)arg;
    return (group.resource ^ member.context) & 1;
}

static void check_acl(const vsc_acl *acl)
{
    vsc_acl again;
    size_t len;
    char *text;
    int i, p;

    for (i = 0; i < acl->n; i++) {
        if (i > 0) {
            vsc_handle a = acl->entries[i - 1].client, b = acl->entries[i].client;
            if (a.context > b.context || (a.context == b.context && a.resource >= b.resource))
                abort();
        }
        for (p = 0; p < VMCI_NUM_PRIVILEGES; p++) {
            int s = acl->entries[i].state[p];
            if (s != 0 && s != VMCI_PRIV_ALLOW && s != VMCI_PRIV_DENY)
                abort();
        }
        for (p = -1; p <= VMCI_NUM_PRIVILEGES; p++) {
            vsc_handle resource = {acl->entries[i].client.resource, acl->entries[i].client.context};
            int rc = vsc_acl_check(acl, resource, acl->entries[i].client, p, member_of_odd, NULL);
            if (rc != VMCI_SUCCESS_ACCESS_GRANTED && rc != VMCI_ERROR_NO_ACCESS && rc != VMCI_ERROR_INVALID_PRIV)
                abort();
        }
    }
    text = vsc_acl_format(acl, &len);
    if (text == NULL)
        return;
    if (vsc_acl_parse(text, len, &again) != 0)
        abort();
    if (again.kind != acl->kind || again.n != acl->n
        || (acl->n > 0 && memcmp(again.entries, acl->entries, (size_t)acl->n * sizeof *acl->entries) != 0))
        abort();
    vsc_acl_free(&again);
    free(text);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vsc_acl acl;
    vsc_group g;

    if (vsc_acl_parse((const char *)data, size, &acl) == 0) {
        check_acl(&acl);
        vsc_acl_free(&acl);
    }
    {
        vsc_policy policy;
        const char *why;
        int line, lines = 1, i;
        size_t k;

        for (k = 0; k < size; k++)
            lines += data[k] == '\n';
        if (vsc_policy_parse((const char *)data, size, &policy, &line, &why) == 0) {
            for (i = 0; i < policy.n; i++)
                if (vsc_policy_flags(&policy, policy.contexts[i].cid) & ~VMCI_PRIVILEGE_ALL_FLAGS)
                    abort();
            (void)vsc_policy_denies(&policy, 3, 4);
            vsc_policy_free(&policy);
        } else if (line < 1 || line > lines || why == NULL || policy.n != 0) {
            abort();
        }
    }
    if (vsc_group_parse((const char *)data, size, &g) == 0) {
        vsc_handle probe = {3, 0};
        if (g.n < 0 || (g.n > 0 && g.members == NULL))
            abort();
        (void)vsc_group_has(&g, probe);
        vsc_group_free(&g);
    }
    return 0;
}
