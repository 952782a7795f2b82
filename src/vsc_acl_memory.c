/*
 * vsockcompat C core: where privileges live over vsock. No runtime directory is shared across
 * kernels, so, as Python's AccessControl without files, this process keeps the privileges of its
 * own resources in memory: its datagram endpoints (their receive path enforces them and tells
 * senders verdicts; a change bumps the ACL epoch word of the endpoint's private account page)
 * and the mirrored regions it serves (their server checks SM_ATTACH at each HELLO).
 */
#define _GNU_SOURCE
#include "vsc_acl.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    vsc_handle endpoint;
    uint8_t *acct;        /* a datagram endpoint's account page; NULL for a region */
    vsc_acl acl; /* n == 0: nothing set */
} mem_entry;

static pthread_mutex_t g_mem_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static mem_entry *g_mem; /* under g_mem_lock */
static int g_nmem, g_capmem;

static int find(vsc_handle h)
{
    int i;

    for (i = 0; i < g_nmem; i++)
        if (g_mem[i].endpoint.context == h.context && g_mem[i].endpoint.resource == h.resource)
            return i;
    return -1;
}

static int copy_acl(const vsc_acl *from, vsc_acl *to)
{
    *to = *from;
    to->entries = NULL;
    if (from->n == 0)
        return 0;
    to->entries = malloc((size_t)from->n * sizeof *to->entries);
    if (to->entries == NULL) {
        to->n = 0;
        return -1;
    }
    memcpy(to->entries, from->entries, (size_t)from->n * sizeof *to->entries);
    return 0;
}

int vsc_acl_memory_register(vsc_handle endpoint, int kind, uint8_t *acct)
{
    int rc = 0;

    pthread_mutex_lock(&g_mem_lock);
    if (find(endpoint) < 0) {
        if (g_nmem == g_capmem) {
            int cap = g_capmem ? g_capmem * 2 : 16;
            mem_entry *grown = realloc(g_mem, (size_t)cap * sizeof *grown);

            if (grown != NULL) {
                g_mem = grown;
                g_capmem = cap;
            }
        }
        if (g_nmem < g_capmem) {
            memset(&g_mem[g_nmem], 0, sizeof g_mem[g_nmem]);
            g_mem[g_nmem].endpoint = endpoint;
            g_mem[g_nmem].acct = acct;
            g_mem[g_nmem].acl.kind = kind;
            g_nmem++;
        } else {
            rc = -1;
        }
    }
    pthread_mutex_unlock(&g_mem_lock);
    return rc;
}

void vsc_acl_memory_unregister(vsc_handle endpoint)
{
    int i;

    pthread_mutex_lock(&g_mem_lock);
    if ((i = find(endpoint)) >= 0) {
        vsc_acl_free(&g_mem[i].acl); /* privileges never pass to the next endpoint at this id */
        g_mem[i] = g_mem[--g_nmem];
    }
    pthread_mutex_unlock(&g_mem_lock);
}

void vsc_acl_memory_forget_all(void)
{
    static const pthread_mutex_t fresh = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

    /* A forked child: the parent's entries (and their pages) are not ours; another thread of
     * the parent may have held the lock at the fork, so the child starts from a fresh one. */
    g_mem = NULL;
    g_nmem = g_capmem = 0;
    memcpy(&g_mem_lock, &fresh, sizeof fresh);
}

int vsc_acl_memory_kind(vsc_handle resource)
{
    int i, kind;

    pthread_mutex_lock(&g_mem_lock);
    kind = (i = find(resource)) >= 0 ? g_mem[i].acl.kind : VSC_KIND_NONE;
    pthread_mutex_unlock(&g_mem_lock);
    return kind;
}

void vsc_acl_memory_lock(void)
{
    pthread_mutex_lock(&g_mem_lock);
}

void vsc_acl_memory_unlock(void)
{
    pthread_mutex_unlock(&g_mem_lock);
}

int vsc_acl_memory_load(vsc_handle resource, vsc_acl *acl)
{
    int i, have = 0;

    memset(acl, 0, sizeof *acl);
    pthread_mutex_lock(&g_mem_lock);
    if ((i = find(resource)) >= 0 && g_mem[i].acl.n > 0)
        have = copy_acl(&g_mem[i].acl, acl) == 0; /* out of memory: nothing enforced, as from files */
    pthread_mutex_unlock(&g_mem_lock);
    return have;
}

int vsc_acl_memory_store(vsc_handle resource, const vsc_acl *acl)
{
    vsc_acl copy;
    int i, rc = VMCI_ERROR_INVALID_ARGS;

    pthread_mutex_lock(&g_mem_lock);
    if ((i = find(resource)) >= 0) {
        rc = VMCI_ERROR_NO_MEM;
        if (copy_acl(acl, &copy) == 0) {
            vsc_acl_free(&g_mem[i].acl);
            g_mem[i].acl = copy;
            /* Tell an endpoint's receiver (it compares the word before each delivery); a region's
             * server reads the privileges at each HELLO. */
            if (g_mem[i].acct != NULL)
                __atomic_fetch_add((uint64_t *)(g_mem[i].acct + VSC_ACCT_OFF_ACL_EPOCH), 1, __ATOMIC_ACQ_REL);
            rc = VMCI_SUCCESS;
        }
    }
    pthread_mutex_unlock(&g_mem_lock);
    return rc;
}
