/*
 * acl_peer: a legacy SDK program driven line by line on stdin, for the access
 * control tests (tests/test_clib_access.py). It owns one datagram handle,
 * printed first as "me <cid> <rid>"; each command prints one line:
 *
 *   send <cid> <rid> <text>        -> <VMCIDatagram_SendTo result>
 *   recv                           -> <result> <src cid> <src rid> <text>
 *   priv <rcid> <rrid> <ccid> <crid> <allow> <deny>
 *                                  -> <VMCIResource_AddClientPrivileges result>
 *        (<allow>/<deny>: comma-separated privilege numbers, or "-" for none;
 *         rcid/rrid "me" for our own handle)
 *   attach <cid> <rid>             -> <VMCISharedMem_Attach result> (detached again)
 *   quit
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "vmcilib.h"

#define MAX_PRIVS 16

static int
ParseList(const char *text, VMCIResourcePrivilegeType *out)
{
   int n = 0;
   const char *p = text;

   if (strcmp(text, "-") == 0) {
      return 0;
   }
   while (*p != '\0' && n < MAX_PRIVS) {
      char *end;
      out[n++] = (VMCIResourcePrivilegeType)strtol(p, &end, 10);
      p = *end == ',' ? end + 1 : end;
      if (end == p && *p != '\0') {
         break;
      }
   }
   return n;
}

int
main(void)
{
   char line[512];
   VMCIHandle me;

   if (VMCI_InitApp(NULL) != VMCI_SUCCESS) {
      fprintf(stderr, "VMCI_InitApp failed\n");
      return 1;
   }
   me = VMCIDatagram_CreateHnd(0);
   if (VMCI_HANDLE_INVALID(me)) {
      fprintf(stderr, "VMCIDatagram_CreateHnd failed\n");
      return 1;
   }
   printf("me %u %u\n", me.context, me.resource);
   fflush(stdout);
   while (fgets(line, sizeof line, stdin) != NULL) {
      char cmd[16], a[32], b[32], text[256];
      unsigned c1, r1, c2, r2;
      int rv;

      line[strcspn(line, "\n")] = '\0';
      if (sscanf(line, "%15s", cmd) != 1) {
         continue;
      }
      if (strcmp(cmd, "quit") == 0) {
         break;
      } else if (strcmp(cmd, "send") == 0 && sscanf(line, "send %u %u %255s", &c1, &r1, text) == 3) {
         rv = VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(c1, r1), me, (uint32)strlen(text), text);
         printf("%d\n", rv);
      } else if (strcmp(cmd, "recv") == 0) {
         VMCIHandle src;
         char buf[256];
         rv = VMCIDatagram_RecvFrom(me, &src, buf, sizeof buf - 1);
         buf[rv > 0 ? rv : 0] = '\0';
         printf("%d %u %u %s\n", rv, src.context, src.resource, buf);
      } else if (strcmp(cmd, "priv") == 0) {
         VMCIResourcePrivilegeType allow[MAX_PRIVS], deny[MAX_PRIVS];
         char rc_s[16], rr_s[16];
         VMCIHandle resource;
         int nallow, ndeny;

         if (sscanf(line, "priv %15s %15s %u %u %31s %31s", rc_s, rr_s, &c2, &r2, a, b) != 6) {
            printf("bad command\n");
            fflush(stdout);
            continue;
         }
         resource = strcmp(rc_s, "me") == 0 ? me
                    : VMCI_MAKE_HANDLE((VMCIId)strtoul(rc_s, NULL, 10), (VMCIId)strtoul(rr_s, NULL, 10));
         nallow = ParseList(a, allow);
         ndeny = ParseList(b, deny);
         rv = VMCIResource_AddClientPrivileges(resource, VMCI_MAKE_HANDLE(c2, r2),
                                               nallow, nallow ? allow : NULL, ndeny, ndeny ? deny : NULL);
         printf("%d\n", rv);
      } else if (strcmp(cmd, "attach") == 0 && sscanf(line, "attach %u %u", &c1, &r1) == 2) {
         void *addr = NULL;
         uint32 size = 0;
         rv = VMCISharedMem_Attach(VMCI_MAKE_HANDLE(c1, r1), &addr, &size);
         if (rv == VMCI_SUCCESS) {
            VMCISharedMem_Detach(VMCI_MAKE_HANDLE(c1, r1));
         }
         printf("%d\n", rv);
      } else {
         printf("bad command\n");
      }
      fflush(stdout);
   }
   VMCIDatagram_DestroyHnd(me);
   VMCI_CleanupApp();
   return 0;
}
