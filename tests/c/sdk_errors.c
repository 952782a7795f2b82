/*
 * sdk_errors: every exported SDK call, its error paths and its behaviour under
 * threads and fork(), printed as "name=value" lines that tests/test_clib.py
 * compares with the codes the Python side returns (README "Where the SDK is silent").
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vmcilib.h"

#define NTHREADS 8
#define PER_THREAD 50

static int cid;

static void
Show(const char *name, long value)
{
   printf("%s=%ld\n", name, value);
   fflush(stdout);
}

static int
IsMine(VMCIHandle h)
{
   return h.context == (VMCIId)cid && h.resource >= 1024 && h.resource != VMCI_INVALID_ID;
}

static void
SleepMs(int ms)
{
   struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
   nanosleep(&ts, NULL);
}

static void
BeforeInit(const char *when)
{
   char name[64], buf[8] = "x";
   VMCIHandle h = VMCI_MAKE_HANDLE(cid, 1024), out;
   void *addr = &addr;
   uint32 size = 7;
   VMCIResourcePrivilegeType priv = VMCI_PRIV_DG_SEND;

#define SHOW(what, value) (snprintf(name, sizeof name, "%s_%s", when, what), Show(name, (long)(value)))
   SHOW("create_invalid", VMCI_HANDLE_INVALID(VMCIDatagram_CreateHnd(0)));
   SHOW("destroy", VMCIDatagram_DestroyHnd(h));
   SHOW("send", VMCIDatagram_SendTo(h, h, 1, buf));
   out = h;
   SHOW("recv", VMCIDatagram_RecvFrom(h, &out, buf, sizeof buf));
   SHOW("recv_src_invalid", VMCI_HANDLE_INVALID(out));
   out = h;
   SHOW("lookup", VMCIDs_Lookup("x", &out));
   SHOW("lookup_out_invalid", VMCI_HANDLE_INVALID(out));
   SHOW("register", VMCIDs_Register("x", h));
   SHOW("unregister", VMCIDs_Unregister("x"));
   SHOW("shm_create_invalid", VMCI_HANDLE_INVALID(VMCISharedMem_Create(128, &addr)));
   SHOW("shm_create_addr_null", addr == NULL);
   SHOW("shm_query", VMCISharedMem_Query(h, &size));
   SHOW("shm_attach", VMCISharedMem_Attach(h, &addr, &size));
   SHOW("shm_detach", VMCISharedMem_Detach(h));
   SHOW("privileges", VMCIResource_AddClientPrivileges(h, h, 1, &priv, 0, NULL));
#undef SHOW
}

static void
Datagrams(void)
{
   static char big[VMCI_MAX_DG_PAYLOAD_SIZE + 1];
   char buf[64];
   VMCIHandle a, b, fixed, src, gone;
   int rv, n;

   a = VMCIDatagram_CreateHnd(0);
   b = VMCIDatagram_CreateHnd(VMCI_INVALID_ID);
   Show("create_auto_ok", IsMine(a) && IsMine(b) && !VMCI_HANDLE_EQUAL(a, b));
   fixed = VMCIDatagram_CreateHnd(4000);
   Show("create_fixed_ok", fixed.context == (VMCIId)cid && fixed.resource == 4000);
   Show("create_fixed_again_invalid", VMCI_HANDLE_INVALID(VMCIDatagram_CreateHnd(4000)));

   /* Sending */
   Show("send_ok", VMCIDatagram_SendTo(b, a, 5, "hello"));
   Show("send_empty", VMCIDatagram_SendTo(b, a, 0, NULL));
   Show("send_null_buffer", VMCIDatagram_SendTo(b, a, 5, NULL));
   Show("send_too_large", VMCIDatagram_SendTo(b, a, VMCI_MAX_DG_PAYLOAD_SIZE + 1, big));
   Show("send_huge_length", VMCIDatagram_SendTo(b, a, 0xFFFFFFFFu, big));
   Show("send_src_not_ours", VMCIDatagram_SendTo(b, VMCI_MAKE_HANDLE(cid, 5555), 1, "x"));
   Show("send_src_invalid", VMCIDatagram_SendTo(b, VMCI_INVALID_HANDLE, 1, "x"));
   Show("send_hypervisor", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(0, 1024), a, 1, "x"));
   Show("send_no_context", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(77777, 1024), a, 1, "x"));
   Show("send_no_resource", VMCIDatagram_SendTo(VMCI_MAKE_HANDLE(cid, 5555), a, 1, "x"));

   /* Receiving */
   src = VMCI_INVALID_HANDLE;
   rv = VMCIDatagram_RecvFrom(b, &src, buf, sizeof buf);
   Show("recv_ok", rv);
   Show("recv_src_ok", VMCI_HANDLE_EQUAL(src, a));
   Show("recv_payload_ok", memcmp(buf, "hello", 5) == 0);
   Show("recv_empty", VMCIDatagram_RecvFrom(b, NULL, NULL, 0));
   Show("recv_null_buffer", VMCIDatagram_RecvFrom(b, &src, NULL, 4));
   Show("recv_not_ours", VMCIDatagram_RecvFrom(VMCI_MAKE_HANDLE(cid, 5555), &src, buf, sizeof buf));
   VMCIDatagram_SendTo(b, a, 10, "0123456789");
   Show("recv_too_small", VMCIDatagram_RecvFrom(b, &src, buf, 4));
   Show("recv_too_small_again", VMCIDatagram_RecvFrom(b, &src, buf, 9));
   src = VMCI_INVALID_HANDLE;
   Show("recv_after_too_small", VMCIDatagram_RecvFrom(b, &src, buf, 10));
   Show("recv_after_too_small_src_ok", VMCI_HANDLE_EQUAL(src, a));
   Show("recv_after_too_small_payload_ok", memcmp(buf, "0123456789", 10) == 0);

   /* The largest datagram, then the queue bound (139264 bytes, headers included). */
   memset(big, 'z', sizeof big);
   Show("send_max", VMCIDatagram_SendTo(b, a, VMCI_MAX_DG_PAYLOAD_SIZE, big));
   Show("send_max_second", VMCIDatagram_SendTo(b, a, VMCI_MAX_DG_PAYLOAD_SIZE, big));
   big[0] = 0;
   Show("recv_max", VMCIDatagram_RecvFrom(b, NULL, big, VMCI_MAX_DG_PAYLOAD_SIZE));
   Show("recv_max_payload_ok", big[0] == 'z' && big[VMCI_MAX_DG_PAYLOAD_SIZE - 1] == 'z');
   for (n = 0; (rv = VMCIDatagram_SendTo(b, a, 1000, big)) >= 0; n++)
      ;
   Show("queue_full_after", n);
   Show("queue_full", rv);
   while (n-- > 0)
      VMCIDatagram_RecvFrom(b, NULL, big, sizeof big);
   Show("queue_drained_send", VMCIDatagram_SendTo(b, a, 1, "x"));
   Show("queue_drained_recv", VMCIDatagram_RecvFrom(b, NULL, buf, sizeof buf));

   /* Destroying */
   gone = VMCIDatagram_CreateHnd(0);
   Show("send_to_live", VMCIDatagram_SendTo(gone, a, 1, "x"));
   Show("destroy", VMCIDatagram_DestroyHnd(gone));
   Show("destroy_again", VMCIDatagram_DestroyHnd(gone));
   Show("destroy_unknown", VMCIDatagram_DestroyHnd(VMCI_MAKE_HANDLE(cid, 9)));
   Show("destroy_invalid", VMCIDatagram_DestroyHnd(VMCI_INVALID_HANDLE));
   Show("send_to_destroyed", VMCIDatagram_SendTo(gone, a, 1, "x"));
   Show("send_from_destroyed", VMCIDatagram_SendTo(a, gone, 1, "x"));
   Show("recv_destroyed", VMCIDatagram_RecvFrom(gone, NULL, buf, sizeof buf));
   VMCIDatagram_DestroyHnd(a);
   VMCIDatagram_DestroyHnd(b);
   VMCIDatagram_DestroyHnd(fixed);
}

static void
Discovery(void)
{
   char longName[VMCI_DS_MAX_NAME_LEN + 2];
   VMCIHandle server = VMCIDatagram_CreateHnd(0), found, group;
   int rv;

   memset(longName, 'n', sizeof longName);
   longName[VMCI_DS_MAX_NAME_LEN + 1] = '\0';
   Show("ds_lookup_null_name", VMCIDs_Lookup(NULL, &found));
   Show("ds_lookup_null_out", VMCIDs_Lookup("x", NULL));
   Show("ds_lookup_long_name", VMCIDs_Lookup(longName, &found));
   Show("ds_register_long_name", VMCIDs_Register(longName, server));
   Show("ds_unregister_long_name", VMCIDs_Unregister(longName));
   longName[VMCI_DS_MAX_NAME_LEN] = '\0';
   Show("ds_lookup_longest_name", VMCIDs_Lookup(longName, &found));
   Show("ds_register_null_name", VMCIDs_Register(NULL, server));
   Show("ds_unregister_null_name", VMCIDs_Unregister(NULL));
   Show("ds_register_invalid_handle", VMCIDs_Register("SDK ERRORS", VMCI_INVALID_HANDLE));

   rv = VMCIDs_Lookup(VMCI_PUBLIC_GROUP_NAME, &group);
   Show("ds_lookup_group", rv);
   Show("ds_group_ok", group.context == 2 && group.resource == 1023);
   Show("ds_unregister_group", VMCIDs_Unregister(VMCI_PUBLIC_GROUP_NAME));
   Show("ds_register", VMCIDs_Register("SDK ERRORS", server));
   Show("ds_register_again", VMCIDs_Register("SDK ERRORS", server));
   found = VMCI_INVALID_HANDLE;
   Show("ds_lookup", VMCIDs_Lookup("SDK ERRORS", &found));
   Show("ds_lookup_ok", VMCI_HANDLE_EQUAL(found, server));
   found = server;
   Show("ds_lookup_case", VMCIDs_Lookup("sdk errors", &found));
   Show("ds_lookup_case_out_invalid", VMCI_HANDLE_INVALID(found));
   Show("ds_unregister", VMCIDs_Unregister("SDK ERRORS"));
   Show("ds_unregister_again", VMCIDs_Unregister("SDK ERRORS"));
   Show("ds_lookup_gone", VMCIDs_Lookup("SDK ERRORS", &found));
   Show("ds_register_dies_with_handle", VMCIDs_Register("SDK ERRORS", server));
   VMCIDatagram_DestroyHnd(server);
   Show("ds_lookup_destroyed", VMCIDs_Lookup("SDK ERRORS", &found));
}

static void
Stubs(void)
{
   VMCIHandle h = VMCIDatagram_CreateHnd(0), other = VMCI_MAKE_HANDLE(3, 1024);
   VMCIResourcePrivilegeType send = VMCI_PRIV_DG_SEND, bad = 99, negative = -1;
   void *addr = &addr;
   uint32 size = 128;

   Show("shm_create_invalid", VMCI_HANDLE_INVALID(VMCISharedMem_Create(128, &addr)));
   Show("shm_create_addr_null", addr == NULL);
   Show("shm_create_null_out_invalid", VMCI_HANDLE_INVALID(VMCISharedMem_Create(128, NULL)));
   Show("shm_query", VMCISharedMem_Query(h, &size));
   Show("shm_query_null", VMCISharedMem_Query(h, NULL));
   Show("shm_attach", VMCISharedMem_Attach(h, &addr, &size));
   Show("shm_attach_null", VMCISharedMem_Attach(h, NULL, &size));
   Show("shm_detach", VMCISharedMem_Detach(h));

   Show("priv_ok", VMCIResource_AddClientPrivileges(h, other, 1, &send, 0, NULL));
   Show("priv_deny_ok", VMCIResource_AddClientPrivileges(h, other, 0, NULL, 1, &send));
   Show("priv_none", VMCIResource_AddClientPrivileges(h, other, 0, NULL, 0, NULL));
   Show("priv_negative_count", VMCIResource_AddClientPrivileges(h, other, -1, &send, 2, &send));
   Show("priv_null_array", VMCIResource_AddClientPrivileges(h, other, 1, NULL, 0, NULL));
   Show("priv_invalid_resource", VMCIResource_AddClientPrivileges(VMCI_INVALID_HANDLE, other, 1, &send, 0, NULL));
   Show("priv_invalid_client", VMCIResource_AddClientPrivileges(h, VMCI_INVALID_HANDLE, 1, &send, 0, NULL));
   Show("priv_unknown", VMCIResource_AddClientPrivileges(h, other, 1, &bad, 0, NULL));
   Show("priv_negative", VMCIResource_AddClientPrivileges(h, other, 0, NULL, 1, &negative));
   VMCIDatagram_DestroyHnd(h);
}

/* Threads */

static VMCIHandle sink;

static void *
Sender(void *arg)
{
   VMCIHandle me = VMCIDatagram_CreateHnd(0);
   long failures = VMCI_HANDLE_INVALID(me) ? PER_THREAD : 0;
   int i;

   (void)arg;
   for (i = 0; i < PER_THREAD && !VMCI_HANDLE_INVALID(me); i++)
      failures += VMCIDatagram_SendTo(sink, me, 8, "datagram") != VMCI_DG_HEADERSIZE + 8;
   return (void *)failures;
}

static void *
Churner(void *arg)
{
   long failures = 0;
   int i;

   (void)arg;
   for (i = 0; i < PER_THREAD; i++) {
      VMCIHandle h = VMCIDatagram_CreateHnd(0);
      failures += !IsMine(h);
      failures += VMCIDatagram_DestroyHnd(h) != VMCI_SUCCESS;
   }
   return (void *)failures;
}

static volatile int receiving;

static void *
BlockedReceiver(void *arg)
{
   char buf[16];

   __atomic_store_n(&receiving, 1, __ATOMIC_SEQ_CST);
   return (void *)(long)VMCIDatagram_RecvFrom(*(VMCIHandle *)arg, NULL, buf, sizeof buf);
}

/* Start a receive on h in another thread and give it time to block. */
static void
StartBlockedReceiver(pthread_t *thread, VMCIHandle *h)
{
   __atomic_store_n(&receiving, 0, __ATOMIC_SEQ_CST);
   pthread_create(thread, NULL, BlockedReceiver, h);
   while (!__atomic_load_n(&receiving, __ATOMIC_SEQ_CST))
      SleepMs(1);
   SleepMs(300);
}

static void
Threads(void)
{
   pthread_t threads[NTHREADS];
   char buf[16];
   void *result;
   long failures = 0;
   VMCIHandle h, peer;
   int i, received = 0;

   sink = VMCIDatagram_CreateHnd(0);
   for (i = 0; i < NTHREADS; i++)
      pthread_create(&threads[i], NULL, Sender, NULL);
   for (i = 0; i < NTHREADS; i++) {
      pthread_join(threads[i], &result);
      failures += (long)result;
   }
   while (received < NTHREADS * PER_THREAD && VMCIDatagram_RecvFrom(sink, NULL, buf, sizeof buf) == 8)
      received++;
   Show("threads_send_failures", failures);
   Show("threads_received", received);
   VMCIDatagram_DestroyHnd(sink);

   failures = 0;
   for (i = 0; i < NTHREADS; i++)
      pthread_create(&threads[i], NULL, Churner, NULL);
   for (i = 0; i < NTHREADS; i++) {
      pthread_join(threads[i], &result);
      failures += (long)result;
   }
   Show("threads_churn_failures", failures);

   /* A receive blocked in one thread returns when another destroys the handle. */
   h = VMCIDatagram_CreateHnd(0);
   StartBlockedReceiver(&threads[0], &h);
   Show("destroy_while_receiving", VMCIDatagram_DestroyHnd(h));
   pthread_join(threads[0], &result);
   Show("recv_interrupted_by_destroy", (long)result);

   /* ... also after a datagram came, when it blocks on that one sender's connection first. */
   h = VMCIDatagram_CreateHnd(0);
   peer = VMCIDatagram_CreateHnd(0);
   Show("hot_send", VMCIDatagram_SendTo(h, peer, 1, "x"));
   Show("hot_recv", VMCIDatagram_RecvFrom(h, NULL, buf, sizeof buf));
   StartBlockedReceiver(&threads[0], &h);
   Show("destroy_while_receiving_hot", VMCIDatagram_DestroyHnd(h));
   pthread_join(threads[0], &result);
   Show("recv_hot_interrupted_by_destroy", (long)result);
   VMCIDatagram_DestroyHnd(peer);

   /* ... and when another cleans the library up. */
   h = VMCIDatagram_CreateHnd(0);
   StartBlockedReceiver(&threads[0], &h);
   VMCI_CleanupApp();
   pthread_join(threads[0], &result);
   Show("recv_interrupted_by_cleanup", (long)result);
   Show("reinit", VMCI_InitApp(NULL));
}

static void
OnAlarm(int sig)
{
   (void)sig;
}

static VMCIHandle lateFrom;

static void *
LateSender(void *arg)
{
   SleepMs(300);
   return (void *)(long)VMCIDatagram_SendTo(*(VMCIHandle *)arg, lateFrom, 4, "late");
}

/* A signal (no SA_RESTART) while RecvFrom blocks: the receive goes on waiting. */
static void
Signals(void)
{
   struct sigaction sa;
   struct itimerval timer;
   sigset_t alarm, old;
   pthread_t thread;
   VMCIHandle h = VMCIDatagram_CreateHnd(0);
   char buf[16];
   void *sent;
   int rv;

   lateFrom = VMCIDatagram_CreateHnd(0);
   memset(&sa, 0, sizeof sa);
   sa.sa_handler = OnAlarm;
   sigaction(SIGALRM, &sa, NULL);
   sigemptyset(&alarm);
   sigaddset(&alarm, SIGALRM);
   pthread_sigmask(SIG_BLOCK, &alarm, &old);
   pthread_create(&thread, NULL, LateSender, &h);
   pthread_sigmask(SIG_SETMASK, &old, NULL);
   memset(&timer, 0, sizeof timer);
   timer.it_value.tv_usec = 100000;
   setitimer(ITIMER_REAL, &timer, NULL);
   rv = VMCIDatagram_RecvFrom(h, NULL, buf, sizeof buf);
   pthread_join(thread, &sent);
   Show("recv_across_signal", rv);
   Show("recv_across_signal_sent", (long)sent);
   VMCIDatagram_DestroyHnd(h);
   VMCIDatagram_DestroyHnd(lateFrom);
}

static void
Fork(void)
{
   VMCIHandle parent = VMCIDatagram_CreateHnd(0), src = VMCI_INVALID_HANDLE;
   char buf[16];
   int status = -1, rv;
   pid_t pid;

   fflush(stdout);
   pid = fork();
   if (pid == 0) {
      /* The parent's handle is not the child's; the child makes its own. */
      int bad = 0;
      VMCIHandle mine;

      bad |= VMCIDatagram_SendTo(parent, parent, 1, "x") != VMCI_ERROR_INVALID_ARGS;
      bad |= (VMCIDatagram_RecvFrom(parent, NULL, buf, sizeof buf) != VMCI_ERROR_INVALID_ARGS) << 1;
      bad |= (VMCIDatagram_DestroyHnd(parent) != VMCI_ERROR_NOT_FOUND) << 2;
      mine = VMCIDatagram_CreateHnd(0);
      bad |= (!IsMine(mine) || VMCI_HANDLE_EQUAL(mine, parent)) << 3;
      bad |= (VMCIDatagram_SendTo(parent, mine, 5, "child") != VMCI_DG_HEADERSIZE + 5) << 4;
      bad |= (VMCIDatagram_SendTo(parent, mine, (uint32)sizeof mine, &mine) != VMCI_DG_HEADERSIZE + (int)sizeof mine) << 5;
      VMCI_CleanupApp();
      _exit(bad);
   }
   waitpid(pid, &status, 0);
   Show("fork_child_status", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
   rv = VMCIDatagram_RecvFrom(parent, &src, buf, sizeof buf);
   Show("fork_parent_recv", rv);
   Show("fork_parent_payload_ok", rv == 5 && memcmp(buf, "child", 5) == 0);
   rv = VMCIDatagram_RecvFrom(parent, NULL, buf, sizeof buf);
   Show("fork_src_ok", rv == (int)sizeof src && memcmp(buf, &src, sizeof src) == 0 && IsMine(src));
   Show("fork_parent_send", VMCIDatagram_SendTo(parent, parent, 2, "ok"));
   Show("fork_parent_recv_own", VMCIDatagram_RecvFrom(parent, NULL, buf, sizeof buf));
   Show("fork_parent_destroy", VMCIDatagram_DestroyHnd(parent));
}

int
main(void)
{
   const char *env = getenv("VSOCKCOMPAT_CID");

   cid = env != NULL && *env ? atoi(env) : 2;
   BeforeInit("before_init");
   Show("init", VMCI_InitApp(NULL));
   Show("init_device", VMCI_InitApp("/dev/vmci"));
   Datagrams();
   Discovery();
   Stubs();
   Threads();
   Signals();
   Fork();
   VMCI_CleanupApp();
   BeforeInit("after_cleanup");
   VMCI_CleanupApp();
   Show("done", 1);
   return 0;
}
