/*
 * vsock_probe: the SDK's calls driven line by line from stdin, each answered with one
 * "name=value ..." line on stdout, so that tests/real_vsock/test_clib_vsock.py can run a
 * legacy C program against Python peers over real AF_VSOCK step by step. Built from
 * vmcilib.h alone, as a user of the SDK would.
 *
 *   init                  VMCI_InitApp                         init=<rc>
 *   create <rid>          VMCIDatagram_CreateHnd (0: any)       create=<cid> <rid>  (our handle)
 *   send <cid> <rid> <n>  n pattern bytes from our handle       send=<rc>
 *   recv                  VMCIDatagram_RecvFrom                 recv=<rc> <cid> <rid> <pattern ok>
 *   recvn <n>             the same into an n-byte buffer        recvn=<rc> <cid> <rid> <pattern ok>
 *   say <cid> <rid> <text>        the text (to the line's end)  say=<rc>
 *   sendpre <cid> <rid> <n> <word>  n bytes: word, a space, then the pattern's bytes from there on
 *   recvtext              receive one; its first 400 bytes     recvtext=<rc> <cid> <rid> <text>
 *   recvsum               receive one; its 32-bit FNV-1a       recvsum=<rc> <cid> <rid> <fnv1a>
 *   echo                  receive one, send it back             echo=<rc>
 *   sendwait <cid> <rid> <code>  send 1 byte every 20 ms until the result is <code> (30 s at most)
 *   register|unregister|lookup <name>                           <call>=<rc> [<cid> <rid>]
 *   deny|allow <cid> <rid>  DG_SEND on our handle               deny=<rc>
 *   shm                   the four VMCISharedMem_* calls        shm=<invalid> <query> <attach> <detach>
 *   quit                  VMCI_CleanupApp, exit 0
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vmcilib.h"

#define MAX_PAYLOAD (17 * 4096 - 24)

static unsigned char buf[MAX_PAYLOAD + 1];
static VMCIHandle me = {VMCI_INVALID_ID, VMCI_INVALID_ID};

static void
Fill(uint32 n)
{
   uint32 i;

   for (i = 0; i < n; i++) {
      buf[i] = (unsigned char)(i * 7 + 3);
   }
}

static int
PatternOk(int n)
{
   int i;

   for (i = 0; i < n; i++) {
      if (buf[i] != (unsigned char)(i * 7 + 3)) {
         return 0;
      }
   }
   return 1;
}

static unsigned long
Fnv1a(int n)
{
   unsigned long h = 2166136261ul;
   int i;

   for (i = 0; i < n; i++) {
      h = ((h ^ buf[i]) * 16777619ul) & 0xFFFFFFFFul;
   }
   return h;
}

static int
SendWait(VMCIHandle dst, int want)
{
   struct timespec pause = {0, 20 * 1000000L};
   int i, rc = 0;

   for (i = 0; i < 1500; i++) {
      rc = VMCIDatagram_SendTo(dst, me, 1, "x");
      if (rc == want || (want > 0 && rc > 0)) {
         break;
      }
      nanosleep(&pause, NULL);
   }
   return rc;
}

int
main(void)
{
   char line[512], cmd[32], name[400];
   unsigned long a, b, c;
   long code;

   setvbuf(stdout, NULL, _IOLBF, 0);
   while (fgets(line, sizeof line, stdin) != NULL) {
      name[0] = '\0';
      a = b = c = 0;
      if (sscanf(line, "%31s", cmd) != 1) {
         continue;
      }
      if (strcmp(cmd, "init") == 0) {
         printf("init=%d\n", VMCI_InitApp(NULL));
      } else if (strcmp(cmd, "create") == 0 && sscanf(line, "%*s %lu", &a) == 1) {
         me = VMCIDatagram_CreateHnd((uint32)a);
         printf("create=%u %u\n", me.context, me.resource);
      } else if (strcmp(cmd, "send") == 0 && sscanf(line, "%*s %lu %lu %lu", &a, &b, &c) == 3) {
         Fill((uint32)c);
         printf("send=%d\n", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(a, b), me, (uint32)c, buf));
      } else if (strcmp(cmd, "recv") == 0 || (strcmp(cmd, "recvn") == 0 && sscanf(line, "%*s %lu", &a) == 1
                                              && a <= sizeof buf)) {
         VMCIHandle src = VMCI_INVALID_HANDLE;
         int rc = VMCIDatagram_RecvFrom(me, &src, buf, cmd[4] == 'n' ? (uint32)a : sizeof buf);
         printf("%s=%d %u %u %d\n", cmd, rc, src.context, src.resource, rc >= 0 && PatternOk(rc));
      } else if (strcmp(cmd, "say") == 0 && sscanf(line, "%*s %lu %lu %399[^\n]", &a, &b, name) == 3) {
         printf("say=%d\n", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(a, b), me, (uint32)strlen(name), name));
      } else if (strcmp(cmd, "sendpre") == 0
                 && sscanf(line, "%*s %lu %lu %lu %398s", &a, &b, &c, name) == 4 && c <= MAX_PAYLOAD) {
         size_t n = strlen(name);
         Fill((uint32)c);
         name[n++] = ' ';
         memcpy(buf, name, n < c ? n : c);
         printf("sendpre=%d\n", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(a, b), me, (uint32)c, buf));
      } else if (strcmp(cmd, "recvtext") == 0 || strcmp(cmd, "recvsum") == 0) {
         VMCIHandle src = VMCI_INVALID_HANDLE;
         int rc = VMCIDatagram_RecvFrom(me, &src, buf, sizeof buf);
         if (cmd[4] == 't') {
            printf("recvtext=%d %u %u %.*s\n", rc, src.context, src.resource, rc > 400 ? 400 : rc > 0 ? rc : 0,
                   (const char *)buf);
         } else {
            printf("recvsum=%d %u %u %lu\n", rc, src.context, src.resource, Fnv1a(rc));
         }
      } else if (strcmp(cmd, "echo") == 0) {
         VMCIHandle src = VMCI_INVALID_HANDLE;
         int rc = VMCIDatagram_RecvFrom(me, &src, buf, sizeof buf);
         if (rc >= 0) {
            rc = VMCIDatagram_SendTo(src, me, (uint32)rc, buf);
         }
         printf("echo=%d\n", rc);
      } else if (strcmp(cmd, "sendwait") == 0 && sscanf(line, "%*s %lu %lu %ld", &a, &b, &code) == 3) {
         printf("sendwait=%d\n", SendWait(VMCI_MAKE_HANDLE(a, b), (int)code));
      } else if (strcmp(cmd, "register") == 0 && sscanf(line, "%*s %399[^\n]", name) == 1) {
         printf("register=%d\n", VMCIDs_Register(name, me));
      } else if (strcmp(cmd, "unregister") == 0 && sscanf(line, "%*s %399[^\n]", name) == 1) {
         printf("unregister=%d\n", VMCIDs_Unregister(name));
      } else if (strcmp(cmd, "lookup") == 0 && sscanf(line, "%*s %399[^\n]", name) == 1) {
         VMCIHandle found;
         int rc = VMCIDs_Lookup(name, &found);
         printf("lookup=%d %u %u\n", rc, found.context, found.resource);
      } else if ((strcmp(cmd, "deny") == 0 || strcmp(cmd, "allow") == 0)
                 && sscanf(line, "%*s %lu %lu", &a, &b) == 2) {
         VMCIResourcePrivilegeType priv = VMCI_PRIV_DG_SEND;
         int deny = cmd[0] == 'd';
         printf("%s=%d\n", cmd, VMCIResource_AddClientPrivileges(me, VMCI_MAKE_HANDLE(a, b), deny ? 0 : 1,
                                                                 deny ? NULL : &priv, deny ? 1 : 0,
                                                                 deny ? &priv : NULL));
      } else if (strcmp(cmd, "shm") == 0) {
         void *addr = NULL;
         uint32 size = 0;
         VMCIHandle region = VMCISharedMem_Create(4096, &addr);
         int invalid = VMCI_HANDLE_INVALID(region) && addr == NULL;
         int query = VMCISharedMem_Query(VMCI_MAKE_HANDLE(me.context, 4242), &size);
         int attach = VMCISharedMem_Attach(VMCI_MAKE_HANDLE(me.context, 4242), &addr, &size);
         printf("shm=%d %d %d %d\n", invalid, query, attach,
                VMCISharedMem_Detach(VMCI_MAKE_HANDLE(me.context, 4242)));
      } else if (strcmp(cmd, "quit") == 0) {
         VMCI_CleanupApp();
         return 0;
      } else {
         printf("unknown=%s\n", cmd);
      }
   }
   VMCI_CleanupApp();
   return 0;
}
