/*
 * datagramApp: the VMCI SDK's datagram sample (Workstation 6.0), as described in
 * vmci-sdk.md section 7.1 -- options, texts and exit statuses of the original.
 *
 * The server creates a datagram handle, registers it in the discovery service
 * as "HOST INFO" and answers 3 queries with "HELLO, CLIENT!". The client finds
 * the server by name alone, sends "HELLO, SERVER!" and prints the answer.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vmcilib.h"

#define SERVICE_NAME "HOST INFO"
#define BUFFER_SIZE 4096
#define NUM_QUERIES 3
#define SERVER_REPLY "HELLO, CLIENT!"
#define CLIENT_QUERY "HELLO, SERVER!"

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
   VMCIHandle server;
   VMCIHandle client;
   VMCIHandle publicGroup;
   char buf[BUFFER_SIZE];
   int rv;
   int i;

   server = VMCIDatagram_CreateHnd(0);
   if (VMCI_HANDLE_EQUAL(server, VMCI_INVALID_HANDLE)) {
      fprintf(stderr, "Failed to create server datagram handle.\n");
      return;
   }

   rv = VMCIDs_Lookup(VMCI_PUBLIC_GROUP_NAME, &publicGroup);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to lookup public group handle.\n");
      goto destroy;
   }

   rv = VMCIDs_Register(SERVICE_NAME, server);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to register discovery service. rv = %d\n", rv);
      goto destroy;
   }

   printf("Running datagram server --- will respond to %d queries.\n", NUM_QUERIES);
   for (i = 0; i < NUM_QUERIES; i++) {
      rv = VMCIDatagram_RecvFrom(server, &client, buf, BUFFER_SIZE);
      if (rv < 0) {
         fprintf(stderr, "Error in VMCIDatagram_Read.\n");
         break;
      }
      printf("Received message: ");
      fwrite(buf, 1, (size_t)rv, stdout);
      printf("\n");

      rv = VMCIDatagram_SendTo(client, server, strlen(SERVER_REPLY), SERVER_REPLY);
      if (rv < 0) {
         fprintf(stderr, "Error in VMCIDatagram_Send.\n");
         break;
      }
   }

   VMCIDs_Unregister(SERVICE_NAME);
destroy:
   VMCIDatagram_DestroyHnd(server);
}

static void
RunClient(void)
{
   VMCIHandle server;
   VMCIHandle client;
   char buf[BUFFER_SIZE];
   int rv;

   rv = VMCIDs_Lookup(SERVICE_NAME, &server);
   if (rv != VMCI_SUCCESS) {
      fprintf(stderr, "Failed to lookup in discovery service.\n");
      return;
   }

   client = VMCIDatagram_CreateHnd(0);
   if (VMCI_HANDLE_EQUAL(client, VMCI_INVALID_HANDLE)) {
      fprintf(stderr, "Failed to create client datagram handle.\n");
      return;
   }

   VMCIDatagram_SendTo(server, client, strlen(CLIENT_QUERY), CLIENT_QUERY);
   rv = VMCIDatagram_RecvFrom(client, NULL, buf, BUFFER_SIZE);
   if (rv >= 0) {
      printf("Received message: ");
      fwrite(buf, 1, (size_t)rv, stdout);
      printf("\n");
   }

   VMCIDatagram_DestroyHnd(client);
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
         Usage("datagramApp");
      }
   }
   if (optind != argc || server == client) {
      Usage("datagramApp");
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
