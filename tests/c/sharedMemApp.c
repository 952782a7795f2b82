/*
 * sharedMemApp: the VMCI SDK's shared memory sample (Workstation 6.0), as described in
 * vmci-sdk.md section 7.2 -- options, texts and exit statuses of the original.
 *
 * The server creates a 128-byte shared memory region, registers it in the discovery
 * service as "HOST TIME" and writes the current time into it every second for 10
 * seconds. The client finds the region by name alone, checks its size, attaches and
 * prints what the server wrote, three times, one second apart.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "vmcilib.h"

#define SERVICE_NAME "HOST TIME"
#define SHMEM_SIZE 128
#define SERVER_SECONDS 10
#define NUM_READINGS 3
#define TIME_BUFFER 127

static void
Usage(const char *prog)
{
   fprintf(stderr, "%s [-d <VMCI device>] -c|-s\n", prog);
   fprintf(stderr, "\t\tMust provide exactly one of -c OR -s.\n");
   fprintf(stderr, "%s -h:\n", prog);
   fprintf(stderr, "\tPrints this help message.\n");
   exit(-1);
}

static void
RunServer(void)
{
   VMCIHandle handle;
   VMCIHandle publicGroup;
   void *addr;
   char timeBuf[TIME_BUFFER];
   time_t now;
   int rv;
   int j;

   handle = VMCISharedMem_Create(SHMEM_SIZE, &addr);
   if (VMCI_HANDLE_EQUAL(handle, VMCI_INVALID_HANDLE)) {
      fprintf(stderr, "Failed to create server shared memory region.\n");
      return;
   }
   memset(addr, 0, SHMEM_SIZE);

   rv = VMCIDs_Lookup(VMCI_PUBLIC_GROUP_NAME, &publicGroup);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to lookup public group handle.\n");
      goto detach;
   }

   rv = VMCIDs_Register(SERVICE_NAME, handle);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to register discovery service. rv = %d\n", rv);
      goto detach;
   }

   printf("Running shared memory server for %d seconds.\n", SERVER_SECONDS);
   fflush(stdout);
   for (j = 0; j < SERVER_SECONDS; j++) {
      now = time(NULL);
      strftime(timeBuf, sizeof timeBuf, "%a %b %d %H:%M:%S %Z %Y", localtime(&now));
      memcpy(addr, timeBuf, strlen(timeBuf));
      sleep(1);
      fprintf(stderr, "%d.", j);
   }
   fprintf(stderr, "\n");

   VMCIDs_Unregister(SERVICE_NAME);
detach:
   VMCISharedMem_Detach(handle);
}

static void
RunClient(void)
{
   VMCIHandle handle;
   void *addr;
   const char *text;
   const char *end;
   uint32 size;
   int rv;
   int i;

   rv = VMCIDs_Lookup(SERVICE_NAME, &handle);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to lookup in discovery service.\n");
      return;
   }

   rv = VMCISharedMem_Query(handle, &size);
   if (rv < VMCI_SUCCESS) {
      fprintf(stderr, "Failed to query size of shared memory region.\n");
      return;
   }
   if (size != SHMEM_SIZE) {
      fprintf(stderr, "Got wrong size of shared memory region.\n");
      fprintf(stderr, "Should be %d, got %u\n", SHMEM_SIZE, (unsigned)size);
      return;
   }

   rv = VMCISharedMem_Attach(handle, &addr, &size);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to attach to shared memory region. rv = %d\n", rv);
      return;
   }

   for (i = 0; i < NUM_READINGS; i++) {
      text = addr;
      end = memchr(text, '\0', SHMEM_SIZE);
      fwrite(text, 1, end != NULL ? (size_t)(end - text) : SHMEM_SIZE, stdout);
      printf("\n");
      fflush(stdout);
      sleep(1);
   }

   VMCISharedMem_Detach(handle);
}

int
main(int argc, char **argv)
{
   char *device = NULL;
   int server = 0;
   int client = 0;
   int c;

   while ((c = getopt(argc, argv, "d:sch")) != -1) {
      switch (c) {
      case 'd':
         device = optarg;
         break;
      case 's':
         server = 1;
         break;
      case 'c':
         client = 1;
         break;
      case 'h':
      default:
         Usage("sharedMemApp");
      }
   }
   if (optind != argc || server == client) {
      Usage("sharedMemApp");
   }

   if (VMCI_InitApp(device) != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to init VMCI library.\n");
      exit(-2);
   }

   if (server) {
      RunServer();
   } else {
      RunClient();
   }

   VMCI_CleanupApp();
   return 0;
}
