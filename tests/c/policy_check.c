/*
 * policy_check FILE: the C core's reading of a policy file (src/vsc_policy.c), for
 * tests/test_clib_access.py to compare with vsockcompat/policy.py. Prints "ok" and one
 * line "<cid> <flags> <uid or ->" per context, or "error <line> <why>".
 */
#include <stdio.h>
#include <stdlib.h>

#include "vsc_policy.h"

int main(int argc, char **argv)
{
    static char text[1 << 20];
    vsc_policy policy;
    const char *why;
    size_t len;
    FILE *f;
    int line, i;

    if (argc != 2 || (f = fopen(argv[1], "rb")) == NULL)
        return 2;
    len = fread(text, 1, sizeof text, f);
    fclose(f);
    if (vsc_policy_parse(text, len, &policy, &line, &why) != 0) {
        printf("error %d %s\n", line, why);
        return 0;
    }
    printf("ok\n");
    for (i = 0; i < policy.n; i++) {
        if (policy.contexts[i].has_uid)
            printf("%u %d %u\n", policy.contexts[i].cid, policy.contexts[i].flags, policy.contexts[i].uid);
        else
            printf("%u %d -\n", policy.contexts[i].cid, policy.contexts[i].flags);
    }
    vsc_policy_free(&policy);
    return 0;
}
