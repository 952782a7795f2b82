/*
 * pingpong: datagram round trips through the VMCI SDK calls only (vmcilib.h),
 * the C side of benchmarks/c_pingpong.py; tests/c/raw_pingpong.c is the same
 * over a bare AF_UNIX SOCK_SEQPACKET socket.
 *
 *   pingpong -s
 *      Registers a datagram handle as "PINGPONG" in the discovery service,
 *      prints "registered" and echoes every datagram to its source. An empty
 *      datagram is echoed too and then stops the server.
 *   pingpong [-b BATCHES] [-q] -c N SIZE
 *      Looks "PINGPONG" up, warms up, then times BATCHES (default 7) batches
 *      of N round trips of SIZE payload bytes (clock_gettime, CLOCK_MONOTONIC)
 *      and prints "name=value" lines: the median, mean, min and max of the
 *      batches' microseconds per round trip, and cpu_us, this process's CPU time
 *      per round trip over the batches. -q stops the server afterwards.
 *
 * Exit status: 0 on success, 1 on a failed call or a wrong echo, 2 on usage.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vmcilib.h"

#define SERVICE_NAME "PINGPONG"
#define DEFAULT_BATCHES 7
#define MAX_BATCHES 1000

static char buf[VMCI_MAX_DG_PAYLOAD_SIZE];
static char payload[VMCI_MAX_DG_PAYLOAD_SIZE];

static void
Usage(void)
{
   fprintf(stderr, "usage: pingpong -s\n"
                   "       pingpong [-b BATCHES] [-q] -c N SIZE   (SIZE 1..%d)\n",
           VMCI_MAX_DG_PAYLOAD_SIZE);
   exit(2);
}

static double
Now(void)
{
   struct timespec ts;

   clock_gettime(CLOCK_MONOTONIC, &ts);
   return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* This process's CPU time (user and system), in seconds. */
static double
CpuNow(void)
{
   struct timespec ts;

   clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
   return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int
CompareDoubles(const void *a, const void *b)
{
   double x = *(const double *)a, y = *(const double *)b;

   return (x > y) - (x < y);
}

static int
RunServer(void)
{
   VMCIHandle server, client;
   int rv, status = 1;

   server = VMCIDatagram_CreateHnd(0);
   if (VMCI_HANDLE_INVALID(server)) {
      fprintf(stderr, "pingpong: VMCIDatagram_CreateHnd failed\n");
      return 1;
   }
   rv = VMCIDs_Register(SERVICE_NAME, server);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "pingpong: VMCIDs_Register failed: %d\n", rv);
      goto destroy;
   }
   printf("registered\n");
   fflush(stdout);
   for (;;) {
      rv = VMCIDatagram_RecvFrom(server, &client, buf, sizeof buf);
      if (rv < 0) {
         fprintf(stderr, "pingpong: VMCIDatagram_RecvFrom failed: %d\n", rv);
         break;
      }
      if (VMCIDatagram_SendTo(client, server, (uint32)rv, buf) < 0) {
         fprintf(stderr, "pingpong: VMCIDatagram_SendTo failed\n");
         break;
      }
      if (rv == 0) {
         status = 0;
         break;
      }
   }
   VMCIDs_Unregister(SERVICE_NAME);
destroy:
   VMCIDatagram_DestroyHnd(server);
   return status;
}

/* n round trips of size bytes; returns 0, or -1 after printing what went wrong. */
static int
RoundTrips(VMCIHandle server, VMCIHandle client, long n, uint32 size)
{
   long i;
   int rv;

   for (i = 0; i < n; i++) {
      rv = VMCIDatagram_SendTo(server, client, size, payload);
      if (rv != (int)VMCI_DG_SIZE(size)) {
         fprintf(stderr, "pingpong: VMCIDatagram_SendTo returned %d\n", rv);
         return -1;
      }
      rv = VMCIDatagram_RecvFrom(client, NULL, buf, sizeof buf);
      if (rv != (int)size || buf[0] != payload[0] || buf[size - 1] != payload[size - 1]) {
         fprintf(stderr, "pingpong: wrong echo (%d bytes)\n", rv);
         return -1;
      }
   }
   return 0;
}

static int
RunClient(long n, uint32 size, int batches, int quit)
{
   VMCIHandle server, client;
   double us[MAX_BATCHES], sum = 0, start, cpu;
   int rv, b, status = 1;
   uint32 i;

   rv = VMCIDs_Lookup(SERVICE_NAME, &server);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "pingpong: VMCIDs_Lookup failed: %d\n", rv);
      return 1;
   }
   client = VMCIDatagram_CreateHnd(0);
   if (VMCI_HANDLE_INVALID(client)) {
      fprintf(stderr, "pingpong: VMCIDatagram_CreateHnd failed\n");
      return 1;
   }
   for (i = 0; i < size; i++)
      payload[i] = (char)('a' + i % 26);

   if (RoundTrips(server, client, n / 10 + 1, size) != 0)
      goto destroy;
   cpu = CpuNow();
   for (b = 0; b < batches; b++) {
      start = Now();
      if (RoundTrips(server, client, n, size) != 0)
         goto destroy;
      us[b] = (Now() - start) * 1e6 / n;
      sum += us[b];
   }
   cpu = (CpuNow() - cpu) * 1e6 / ((double)n * batches);
   qsort(us, (size_t)batches, sizeof us[0], CompareDoubles);
   printf("size=%u\nn=%ld\nbatches=%d\n", size, n, batches);
   printf("median_us=%.3f\nmean_us=%.3f\nmin_us=%.3f\nmax_us=%.3f\n",
          batches % 2 ? us[batches / 2] : (us[batches / 2 - 1] + us[batches / 2]) / 2,
          sum / batches, us[0], us[batches - 1]);
   printf("cpu_us=%.3f\n", cpu);
   status = 0;
destroy:
   if (quit) {
      VMCIDatagram_SendTo(server, client, 0, payload);
      VMCIDatagram_RecvFrom(client, NULL, buf, sizeof buf);
   }
   VMCIDatagram_DestroyHnd(client);
   return status;
}

int
main(int argc, char **argv)
{
   int server = 0, client = 0, quit = 0, batches = DEFAULT_BATCHES, c, status;
   long n = 0, size = 0;
   char *end;

   while ((c = getopt(argc, argv, "scqb:")) != -1) {
      switch (c) {
      case 's':
         server = 1;
         break;
      case 'c':
         client = 1;
         break;
      case 'q':
         quit = 1;
         break;
      case 'b':
         batches = (int)strtol(optarg, &end, 10);
         if (*end != '\0' || batches < 1 || batches > MAX_BATCHES)
            Usage();
         break;
      default:
         Usage();
      }
   }
   if (server == client || argc - optind != (client ? 2 : 0))
      Usage();
   if (client) {
      n = strtol(argv[optind], &end, 10);
      if (*end != '\0' || n < 1)
         Usage();
      size = strtol(argv[optind + 1], &end, 10);
      if (*end != '\0' || size < 1 || size > VMCI_MAX_DG_PAYLOAD_SIZE)
         Usage();
   }

   if (VMCI_InitApp(NULL) != VMCI_SUCCESS) {
      fprintf(stderr, "pingpong: VMCI_InitApp failed\n");
      return 1;
   }
   status = server ? RunServer() : RunClient(n, (uint32)size, batches, quit);
   VMCI_CleanupApp();
   return status;
}
