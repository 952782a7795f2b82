/*
 * raw_pingpong: tests/c/pingpong.c without the SDK, over a bare AF_UNIX
 * SOCK_SEQPACKET connection between two processes, with blocking send/recv:
 * the floor the local transport is built on (benchmarks/c_pingpong.py).
 *
 *   raw_pingpong -s PATH
 *      Listens on PATH, prints "listening" and echoes every message of each
 *      connection in turn until the client closes it. A connection whose
 *      first message is empty (or that closes before sending any) stops the
 *      server; PATH is unlinked then.
 *   raw_pingpong [-b BATCHES] [-q] -c PATH N SIZE
 *      The client, with pingpong's options and output ("name=value" lines).
 *      -q stops the server afterwards.
 *
 * Exit status: 0 on success, 1 on a failed call or a wrong echo, 2 on usage.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_SIZE 69608 /* VMCI_MAX_DG_PAYLOAD_SIZE, so that both accept the same sizes */
#define DEFAULT_BATCHES 7
#define MAX_BATCHES 1000

static char buf[MAX_SIZE];
static char payload[MAX_SIZE];

static void
Usage(void)
{
   fprintf(stderr, "usage: raw_pingpong -s PATH\n"
                   "       raw_pingpong [-b BATCHES] [-q] -c PATH N SIZE   (SIZE 1..%d)\n", MAX_SIZE);
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
Address(const char *path, struct sockaddr_un *addr)
{
   memset(addr, 0, sizeof *addr);
   addr->sun_family = AF_UNIX;
   if (strlen(path) >= sizeof addr->sun_path) {
      fprintf(stderr, "raw_pingpong: socket path too long: %s\n", path);
      return -1;
   }
   strcpy(addr->sun_path, path);
   return 0;
}

static ssize_t
Recv(int fd, void *into, size_t len)
{
   ssize_t n;

   while ((n = recv(fd, into, len, 0)) < 0 && errno == EINTR)
      ;
   return n;
}

static int
RunServer(const char *path)
{
   struct sockaddr_un addr;
   int listener, conn, status = 1;
   ssize_t n;
   long messages;

   if (Address(path, &addr) != 0)
      return 1;
   listener = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
   if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(listener, 8) != 0) {
      perror("raw_pingpong: listen");
      return 1;
   }
   printf("listening\n");
   fflush(stdout);
   for (;;) {
      while ((conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC)) < 0 && errno == EINTR)
         ;
      if (conn < 0) {
         perror("raw_pingpong: accept");
         break;
      }
      for (messages = 0; (n = Recv(conn, buf, sizeof buf)) > 0; messages++) {
         if (send(conn, buf, (size_t)n, MSG_NOSIGNAL) != n) {
            perror("raw_pingpong: send");
            n = -1;
            break;
         }
      }
      close(conn);
      if (n < 0 && errno != ECONNRESET) {
         perror("raw_pingpong: recv");
         break;
      }
      if (n == 0 && messages == 0) {
         status = 0;
         break;
      }
   }
   close(listener);
   unlink(path);
   return status;
}

/* n round trips of size bytes; returns 0, or -1 after printing what went wrong. */
static int
RoundTrips(int fd, long n, size_t size)
{
   long i;
   ssize_t rv;

   for (i = 0; i < n; i++) {
      rv = send(fd, payload, size, MSG_NOSIGNAL);
      if (rv != (ssize_t)size) {
         perror("raw_pingpong: send");
         return -1;
      }
      rv = Recv(fd, buf, sizeof buf);
      if (rv != (ssize_t)size || buf[0] != payload[0] || buf[size - 1] != payload[size - 1]) {
         fprintf(stderr, "raw_pingpong: wrong echo (%zd bytes)\n", rv);
         return -1;
      }
   }
   return 0;
}

static int
Connect(const char *path)
{
   struct sockaddr_un addr;
   int fd;

   if (Address(path, &addr) != 0)
      return -1;
   fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
   if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
      perror("raw_pingpong: connect");
      if (fd >= 0)
         close(fd);
      return -1;
   }
   return fd;
}

static int
RunClient(const char *path, long n, size_t size, int batches, int quit)
{
   double us[MAX_BATCHES], sum = 0, start, cpu;
   int fd, b, status = 1;
   size_t i;

   fd = Connect(path);
   if (fd < 0)
      return 1;
   for (i = 0; i < size; i++)
      payload[i] = (char)('a' + i % 26);

   if (RoundTrips(fd, n / 10 + 1, size) != 0)
      goto out;
   cpu = CpuNow();
   for (b = 0; b < batches; b++) {
      start = Now();
      if (RoundTrips(fd, n, size) != 0)
         goto out;
      us[b] = (Now() - start) * 1e6 / n;
      sum += us[b];
   }
   cpu = (CpuNow() - cpu) * 1e6 / ((double)n * batches);
   qsort(us, (size_t)batches, sizeof us[0], CompareDoubles);
   printf("size=%zu\nn=%ld\nbatches=%d\n", size, n, batches);
   printf("median_us=%.3f\nmean_us=%.3f\nmin_us=%.3f\nmax_us=%.3f\n",
          batches % 2 ? us[batches / 2] : (us[batches / 2 - 1] + us[batches / 2]) / 2,
          sum / batches, us[0], us[batches - 1]);
   printf("cpu_us=%.3f\n", cpu);
   status = 0;
out:
   close(fd);
   if (quit) {
      /* A connection that sends an empty message first stops the server. */
      fd = Connect(path);
      if (fd >= 0) {
         send(fd, payload, 0, MSG_NOSIGNAL);
         Recv(fd, buf, sizeof buf); /* returns 0 when the server closes */
         close(fd);
      }
   }
   return status;
}

int
main(int argc, char **argv)
{
   int server = 0, client = 0, quit = 0, batches = DEFAULT_BATCHES, c;
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
   if (server == client || argc - optind != (client ? 3 : 1))
      Usage();
   if (server)
      return RunServer(argv[optind]);
   n = strtol(argv[optind + 1], &end, 10);
   if (*end != '\0' || n < 1)
      Usage();
   size = strtol(argv[optind + 2], &end, 10);
   if (*end != '\0' || size < 1 || size > MAX_SIZE)
      Usage();
   return RunClient(argv[optind], n, (size_t)size, batches, quit);
}
