/*
 * vsock_echo.c: a VMCI Sockets program written the way VMware's samples were
 * (VMCISock_GetAFValue() for the family, struct sockaddr_vm, the local CID
 * from VMCISock_GetLocalCID()), built unchanged against vsockcompat's
 * vmci_sockets.h on mainline Linux AF_VSOCK.
 *
 *   vsock_echo -s PORT            listen on (VMADDR_CID_ANY, PORT), accept one
 *                                 connection, echo one line back, exit
 *   vsock_echo -c CID PORT TEXT   connect to (CID, PORT), send TEXT and a
 *                                 newline, print the line echoed back
 *
 * WARNING: it creates AF_VSOCK sockets. Run it only where vsock traffic
 * cannot leave the machine (in this project: inside the guest test bed).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <unistd.h>

#include "vmci_sockets.h"

#define LINE_MAX_LEN 4096

static void Usage(void)
{
   fprintf(stderr, "usage: vsock_echo -s PORT\n"
                   "       vsock_echo -c CID PORT TEXT\n");
}

static int ParseUint(const char *text, unsigned int *out)
{
   char *end;
   unsigned long value;

   errno = 0;
   value = strtoul(text, &end, 0);
   if (errno != 0 || end == text || *end != '\0' || value > 0xFFFFFFFFul) {
      return -1;
   }
   *out = (unsigned int)value;
   return 0;
}

/* Reads up to and including the first '\n' (or to EOF); returns the length. */
static int ReadLine(int fd, char *buf, int size)
{
   int len = 0;

   while (len < size - 1) {
      ssize_t got = recv(fd, buf + len, 1, 0);
      if (got < 0) {
         if (errno == EINTR) {
            continue;
         }
         return -1;
      }
      if (got == 0) {
         break;
      }
      len++;
      if (buf[len - 1] == '\n') {
         break;
      }
   }
   buf[len] = '\0';
   return len;
}

static int SendAll(int fd, const char *buf, size_t len)
{
   while (len > 0) {
      ssize_t sent = send(fd, buf, len, 0);
      if (sent < 0) {
         if (errno == EINTR) {
            continue;
         }
         return -1;
      }
      buf += sent;
      len -= (size_t)sent;
   }
   return 0;
}

static int RunServer(int af, unsigned int port)
{
   struct sockaddr_vm addr;
   struct sockaddr_vm peer;
   socklen_t peerLen = sizeof peer;
   char line[LINE_MAX_LEN];
   int fd;
   int conn;
   int len;

   fd = socket(af, SOCK_STREAM, 0);
   if (fd < 0) {
      perror("socket");
      return 1;
   }
   memset(&addr, 0, sizeof addr);
   addr.svm_family = af;
   addr.svm_cid = VMADDR_CID_ANY;
   addr.svm_port = port;
   if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
      perror("bind");
      close(fd);
      return 1;
   }
   if (listen(fd, 1) < 0) {
      perror("listen");
      close(fd);
      return 1;
   }
   printf("listening on cid %u port %u\n", VMCISock_GetLocalCID(), port);
   fflush(stdout);

   conn = accept(fd, (struct sockaddr *)&peer, &peerLen);
   if (conn < 0) {
      perror("accept");
      close(fd);
      return 1;
   }
   printf("connection from cid %u port %u\n", peer.svm_cid, peer.svm_port);
   fflush(stdout);
   len = ReadLine(conn, line, sizeof line);
   if (len < 0 || SendAll(conn, line, (size_t)len) < 0) {
      perror("echo");
      close(conn);
      close(fd);
      return 1;
   }
   printf("echoed %d bytes\n", len);
   close(conn);
   close(fd);
   return 0;
}

static int RunClient(int af, unsigned int cid, unsigned int port, const char *text)
{
   struct sockaddr_vm addr;
   char line[LINE_MAX_LEN];
   int fd;
   int len;

   fd = socket(af, SOCK_STREAM, 0);
   if (fd < 0) {
      perror("socket");
      return 1;
   }
   memset(&addr, 0, sizeof addr);
   addr.svm_family = af;
   addr.svm_cid = cid;
   addr.svm_port = port;
   if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
      perror("connect");
      close(fd);
      return 1;
   }
   if (SendAll(fd, text, strlen(text)) < 0 || SendAll(fd, "\n", 1) < 0) {
      perror("send");
      close(fd);
      return 1;
   }
   len = ReadLine(fd, line, sizeof line);
   if (len < 0) {
      perror("recv");
      close(fd);
      return 1;
   }
   printf("%s", line);
   close(fd);
   return 0;
}

int main(int argc, char **argv)
{
   int af;
   int status;
   unsigned int cid;
   unsigned int port;

   if (argc == 3 && strcmp(argv[1], "-s") == 0) {
      if (ParseUint(argv[2], &port) < 0) {
         Usage();
         return 2;
      }
      cid = 0;
   } else if (argc == 5 && strcmp(argv[1], "-c") == 0) {
      if (ParseUint(argv[2], &cid) < 0 || ParseUint(argv[3], &port) < 0) {
         Usage();
         return 2;
      }
   } else {
      Usage();
      return 2;
   }

   af = VMCISock_GetAFValue();
   if (af == -1) {
      fprintf(stderr, "VMCI Sockets are not available (no vsock in this kernel)\n");
      return 1;
   }
   if (argv[1][1] == 's') {
      status = RunServer(af, port);
   } else {
      status = RunClient(af, cid, port, argv[4]);
   }
   return status;
}
