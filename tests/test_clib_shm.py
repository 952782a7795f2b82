"""libvmci.so.0's shared memory (VMCISharedMem_*, src/vsc_shm.c) and sharedMemApp in C
(tests/c/sharedMemApp.c): the Python protocol (vsockcompat/sharedmem.py) spoken by C, so C and
Python processes share regions both ways, on both cores; every error path; fork, threads and
sanitizers. The C peers run under ``vsockcompat run``, as in test_clib.py."""
import os
import re
import signal
import stat
import subprocess
import time
import types

import pytest

from conftest import PYTHON, child_env, make_settings
from test_clib import (CC, RUN, SANITIZE, SANITIZER_ENV, SANITIZER_MARKS, SRC_DIR, _cc, _sanitizers_work,
                       env_for, wait_registered)
from vsockcompat import clib
from vsockcompat.constants import (VMCI_ERROR_ALREADY_EXISTS, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_INVALID_SIZE,
                                   VMCI_ERROR_NO_MEM, VMCI_ERROR_NOT_FOUND, VMCI_ERROR_UNAVAILABLE, VMCI_SUCCESS)
from vsockcompat.runtime import Runtime
from vsockcompat.sdk import VMCILibrary
from vsockcompat.sharedmem import SHM_DIR, shm_prefix

HERE = os.path.dirname(os.path.abspath(__file__))
C_APP = os.path.join(HERE, "c", "sharedMemApp.c")
PY_APP = [PYTHON, "-m", "vsockcompat", "sharedmem-app"]
USAGE = ("sharedMemApp [-d <VMCI device>] -c|-s\n\t\tMust provide exactly one of -c OR -s.\n"
         "sharedMemApp -h:\n\tPrints this help message.\n")
READING = re.compile(r"[A-Z][a-z]{2} [A-Z][a-z]{2} \d\d \d\d:\d\d:\d\d \S+ \d{4}")
PAGE = os.sysconf("SC_PAGE_SIZE")

pytestmark = pytest.mark.skipif(CC is None, reason="no C compiler (cc, gcc or clang) on PATH, and CC unset")

#: A line-driven C peer: one command per stdin line, one answer per stdout line.
PROBE_SOURCE = r"""/* A line-driven VMCI shared memory peer for tests/test_clib_shm.py. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "vmcilib.h"

#define MAX_MAPS 64

static struct {
   VMCIHandle h;
   char *addr;
   uint32 size;
} maps[MAX_MAPS];

static char *
Addr(VMCIHandle h)
{
   int i;

   for (i = 0; i < MAX_MAPS; i++)
      if (maps[i].addr != NULL && VMCI_HANDLE_EQUAL(maps[i].h, h))
         return maps[i].addr;
   return NULL;
}

static void
Remember(VMCIHandle h, void *addr, uint32 size)
{
   int i;

   for (i = 0; i < MAX_MAPS; i++)
      if (maps[i].addr == NULL) {
         maps[i].h = h;
         maps[i].addr = addr;
         maps[i].size = size;
         return;
      }
}

static void
Forget(VMCIHandle h)
{
   int i;

   for (i = 0; i < MAX_MAPS; i++)
      if (maps[i].addr != NULL && VMCI_HANDLE_EQUAL(maps[i].h, h))
         maps[i].addr = NULL;
}

#define THREADS 4
#define ROUNDS 25

static VMCIHandle shared;
static int sharedAttached;
static pthread_mutex_t sharedLock = PTHREAD_MUTEX_INITIALIZER;

static void *
Churn(void *arg)
{
   long failures = 0;
   int i;
   void *addr;
   uint32 size;

   (void)arg;
   for (i = 0; i < ROUNDS; i++) {
      VMCIHandle h = VMCISharedMem_Create(100 + i, &addr);
      if (VMCI_HANDLE_INVALID(h)) {
         failures++;
         continue;
      }
      memset(addr, i, 100 + i);
      failures += VMCISharedMem_Query(h, &size) != VMCI_SUCCESS || size != (uint32)(100 + i);
      failures += VMCISharedMem_Attach(h, &addr, &size) != VMCI_ERROR_ALREADY_EXISTS;
      failures += VMCISharedMem_Detach(h) != VMCI_SUCCESS;
      failures += VMCISharedMem_Detach(h) != VMCI_ERROR_NOT_FOUND;
      size = 0;
      /* The shared region: exactly one thread at a time has it attached. */
      if (VMCISharedMem_Attach(shared, &addr, &size) == VMCI_SUCCESS) {
         pthread_mutex_lock(&sharedLock);
         failures += sharedAttached++ != 0;
         pthread_mutex_unlock(&sharedLock);
         ((char *)addr)[0]++;
         pthread_mutex_lock(&sharedLock);
         sharedAttached--;
         pthread_mutex_unlock(&sharedLock);
         failures += VMCISharedMem_Detach(shared) != VMCI_SUCCESS;
      }
   }
   return (void *)failures;
}

int
main(void)
{
   char line[4096], text[4096];
   unsigned cid, rid, size, offset, len, ccid, crid;
   int nallow, allow, ndeny, deny;
   VMCIHandle h;
   void *addr;
   uint32 sz;

   setvbuf(stdout, NULL, _IOLBF, 0);
   while (fgets(line, sizeof line, stdin) != NULL) {
      text[0] = '\0';
      if (sscanf(line, "init %4095s", text) == 1 || strcmp(line, "init\n") == 0) {
         printf("%d\n", VMCI_InitApp(text[0] ? text : NULL));
      } else if (strcmp(line, "cleanup\n") == 0) {
         VMCI_CleanupApp();
         memset(maps, 0, sizeof maps);
         printf("ok\n");
      } else if (sscanf(line, "create %u", &size) == 1) {
         addr = &addr;
         h = VMCISharedMem_Create(size, &addr);
         if (VMCI_HANDLE_INVALID(h)) {
            printf("invalid %d\n", addr == NULL);
         } else {
            Remember(h, addr, size);
            printf("%u %u\n", (unsigned)h.context, (unsigned)h.resource);
         }
      } else if (sscanf(line, "query %u %u", &cid, &rid) == 2) {
         int rv;
         sz = 77;
         rv = VMCISharedMem_Query(VMCI_MAKE_HANDLE(cid, rid), &sz);
         printf("%d %u\n", rv, (unsigned)sz);
      } else if (sscanf(line, "attach %u %u %u", &cid, &rid, &size) == 3) {
         int rv;
         sz = size;
         addr = &addr;
         rv = VMCISharedMem_Attach(VMCI_MAKE_HANDLE(cid, rid), &addr, &sz);
         if (rv == VMCI_SUCCESS)
            Remember(VMCI_MAKE_HANDLE(cid, rid), addr, sz);
         printf("%d %u %d\n", rv, (unsigned)sz, addr == NULL);
      } else if (sscanf(line, "detach %u %u", &cid, &rid) == 2) {
         int rv = VMCISharedMem_Detach(VMCI_MAKE_HANDLE(cid, rid));
         if (rv == VMCI_SUCCESS)
            Forget(VMCI_MAKE_HANDLE(cid, rid));
         printf("%d\n", rv);
      } else if (sscanf(line, "write %u %u %u %4095s", &cid, &rid, &offset, text) == 4) {
         char *p = Addr(VMCI_MAKE_HANDLE(cid, rid));
         if (p == NULL) {
            printf("unmapped\n");
         } else {
            memcpy(p + offset, text, strlen(text));
            printf("ok\n");
         }
      } else if (sscanf(line, "read %u %u %u %u", &cid, &rid, &offset, &len) == 4) {
         char *p = Addr(VMCI_MAKE_HANDLE(cid, rid));
         if (p == NULL) {
            printf("unmapped\n");
         } else {
            char *end = memchr(p + offset, '\0', len);
            printf("[%.*s]\n", (int)(end != NULL ? end - (p + offset) : (long)len), p + offset);
         }
      } else if (sscanf(line, "deny %u %u %u", &cid, &rid, &size) == 3) {
         /* Deny context size SM_ATTACH on (cid, rid). */
         VMCIResourcePrivilegeType priv = VMCI_PRIV_SM_ATTACH;
         printf("%d\n", VMCIResource_AddClientPrivileges(VMCI_MAKE_HANDLE(cid, rid), VMCI_MAKE_HANDLE(size, 0),
                                                         0, NULL, 1, &priv));
      } else if (sscanf(line, "priv %u %u %u %u %d %d %d %d", &cid, &rid, &ccid, &crid, &nallow, &allow,
                        &ndeny, &deny) == 8 && nallow <= 4 && ndeny <= 4) {
         /* VMCIResource_AddClientPrivileges(resource, client, nallow x allow, ndeny x deny). */
         VMCIResourcePrivilegeType allows[4] = {allow, allow, allow, allow}, denies[4] = {deny, deny, deny, deny};
         printf("%d\n", VMCIResource_AddClientPrivileges(VMCI_MAKE_HANDLE(cid, rid), VMCI_MAKE_HANDLE(ccid, crid),
                                                         nallow, allows, ndeny, denies));
      } else if (sscanf(line, "nulls %u %u", &cid, &rid) == 2) {
         h = VMCI_MAKE_HANDLE(cid, rid);
         sz = 0;
         printf("%d %d %d %d\n", VMCI_HANDLE_INVALID(VMCISharedMem_Create(128, NULL)),
                VMCISharedMem_Query(h, NULL), VMCISharedMem_Attach(h, NULL, &sz),
                VMCISharedMem_Attach(h, &addr, NULL));
      } else if (sscanf(line, "fork %u %u", &cid, &rid) == 2) {
         /* The child forgets the parent's mapping without touching the region. */
         int status = -1;
         pid_t pid;

         h = VMCI_MAKE_HANDLE(cid, rid);
         pid = fork();
         if (pid == 0) {
            int bad = 0;
            void *mine = NULL;
            uint32 any = 0;
            bad |= VMCISharedMem_Detach(h) != VMCI_ERROR_NOT_FOUND;
            bad |= (VMCISharedMem_Query(h, &any) != VMCI_SUCCESS) << 1;
            bad |= (VMCISharedMem_Attach(h, &mine, &any) != VMCI_SUCCESS) << 2;
            bad |= (mine == NULL || strncmp(mine, "parent", 6) != 0) << 3;
            if (mine != NULL)
               memcpy(mine, "child!", 6);
            bad |= (VMCISharedMem_Detach(h) != VMCI_SUCCESS) << 4;
            VMCI_CleanupApp();
            _exit(bad);
         }
         waitpid(pid, &status, 0);
         printf("%d\n", WIFEXITED(status) ? WEXITSTATUS(status) : -1);
      } else if (sscanf(line, "threads %u %u", &cid, &rid) == 2) {
         /* Regions created and detached on every thread; all of them racing to attach the
          * peer's region (cid, rid), which this process can map only once at a time. */
         pthread_t threads[THREADS];
         long failures = 0;
         void *result;
         int i;

         shared = VMCI_MAKE_HANDLE(cid, rid);
         for (i = 0; i < THREADS; i++)
            pthread_create(&threads[i], NULL, Churn, NULL);
         for (i = 0; i < THREADS; i++) {
            pthread_join(threads[i], &result);
            failures += (long)result;
         }
         printf("%ld\n", failures);
      } else if (strcmp(line, "quit\n") == 0) {
         break;
      } else {
         printf("?\n");
      }
   }
   return 0;
}
"""

#: vsc_shm_create's own codes (VMCISharedMem_Create shows only VMCI_INVALID_HANDLE), built from
#: the sources with statvfs() replaced, so that "too large" needs no huge /dev/shm.
INTERNAL_SOURCE = r"""/* vsc_shm_create's codes, which VMCISharedMem_Create reduces to VMCI_INVALID_HANDLE. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <sys/statvfs.h>

#include "vsc_shm.h"

static unsigned long long fake_free; /* 0: the real statvfs */

int
statvfs(const char *path, struct statvfs *st)
{
   memset(st, 0, sizeof *st);
   st->f_frsize = st->f_bsize = 4096;
   st->f_bavail = st->f_bfree = st->f_blocks = fake_free ? fake_free / 4096 : 1ull << 40;
   (void)path;
   return 0;
}

int
main(int argc, char **argv)
{
   vsc_local t;
   vsc_region *r = (vsc_region *)&t;
   int rc;

   if (vsc_local_open(&t) != 0)
      return 2;
   rc = vsc_shm_create(&t, 0, &r);
   printf("zero=%d %d\n", rc, r == NULL);
   fake_free = 8192;
   printf("fits=%d\n", vsc_shm_create(&t, 8192, &r));
   if (r != NULL)
      printf("detach=%d\n", vsc_shm_detach(&t, r));
   rc = vsc_shm_create(&t, 8193, &r);
   printf("over=%d %d\n", rc, r == NULL);
   rc = vsc_shm_create(&t, 0xFFFFFFFFu, &r);
   printf("max=%d %d\n", rc, r == NULL);
   (void)argc;
   (void)argv;
   return 0;
}
"""


def build(out_dir, extra=()):
    """libvmci.so.0, sharedMemApp and the probe (as SDK users build them), and the internal program."""
    extra = list(extra)
    lib_dir = os.path.join(out_dir, "lib")
    library = clib.build_libvmci(lib_dir, src_dir=SRC_DIR, extra_cflags=extra + ["-Wpedantic", "-Werror"],
                                 extra_ldflags=extra)
    for name, text in (("shm_probe.c", PROBE_SOURCE), ("shm_internal.c", INTERNAL_SOURCE)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
    flags = ["-Wall", "-Wextra", "-Wpedantic", "-g", "-I", SRC_DIR] + extra
    programs = {}
    for name, src in (("sharedMemApp", C_APP), ("shm_probe", os.path.join(out_dir, "shm_probe.c"))):
        exe = os.path.join(out_dir, name)
        warnings = _cc(flags + [src, "-o", exe, "-L", lib_dir, "-lvmci", "-pthread"], out_dir)
        assert warnings == "", warnings
        programs[name] = exe
    exe = os.path.join(out_dir, "shm_internal")
    warnings = _cc(["-std=c11"] + flags + [os.path.join(out_dir, "shm_internal.c")]
                   + [os.path.join(SRC_DIR, n) for n in ("vsc_shm.c", "vsc_local.c", "vsc_dgram.c")]
                   + ["-o", exe, "-pthread"], out_dir)
    assert warnings == "", warnings
    programs["shm_internal"] = exe
    return types.SimpleNamespace(library=library, lib_dir=lib_dir, **programs)


@pytest.fixture(scope="module")
def cbuild(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("clibshm")))


def objects(rundir):
    return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(shm_prefix(rundir)))


def markers(rundir):
    found = []
    for cdir in sorted(os.listdir(rundir)):
        if cdir.startswith("c") and os.path.isdir(os.path.join(rundir, cdir)):
            found += ["%s/%s" % (cdir, n) for n in sorted(os.listdir(os.path.join(rundir, cdir)))
                      if n.endswith(".shm")]
    return found


@pytest.fixture
def clean_shm(rundir):
    """Every test leaves no shm object and no marker of its runtime directory behind."""
    yield
    assert objects(rundir) == [] and markers(rundir) == []


class Probe:
    """The C peer (PROBE_SOURCE) under `vsockcompat run`, in context cid."""

    def __init__(self, program, rundir, core_name, library, cid=2, **extra):
        env = env_for(rundir, core_name, library, cid=cid, **extra)
        self.proc = subprocess.Popen(RUN + ["--", program], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def __call__(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer.endswith("\n"), "the probe died: %s" % self.proc.stderr.read()
        return answer[:-1]

    def ints(self, command):
        return [int(v) for v in self(command).split()]

    def priv(self, resource, client, allow=(), deny=(), counts=None):
        """VMCIResource_AddClientPrivileges's code. Each list holds one privilege, repeated at
        most 4 times (the probe's arrays); ``counts``, if given, are the counts passed instead."""
        for privs in (allow, deny):
            assert len(set(privs)) <= 1 and len(privs) <= 4, privs
        nallow, ndeny = counts or (len(allow), len(deny))
        words = tuple(resource) + tuple(client) + (nallow, allow[0] if allow else 0, ndeny, deny[0] if deny else 0)
        return int(self("priv %d %d %d %d %d %d %d %d" % words))

    def close(self):
        """Quit without VMCI_CleanupApp; returns stderr."""
        try:
            _, err = self.proc.communicate("quit\n" if self.proc.poll() is None else None, timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        return err


@pytest.fixture
def probe(cbuild, rundir, core):
    probes = []

    def make(cid=2, build=None, **extra):
        b = build or cbuild
        p = Probe(b.shm_probe, rundir, core.NAME, b.library, cid=cid, **extra)
        probes.append(p)
        return p
    yield make
    for p in probes:
        assert p.close() == ""


@pytest.fixture
def pylib(core, rundir):
    """The Python SDK in context 3 of the same runtime directory, on the test's core."""
    lib = VMCILibrary(Runtime(make_settings(rundir, cid=3), core=core))
    assert lib.VMCI_InitApp(None) == VMCI_SUCCESS
    yield lib
    lib.VMCI_CleanupApp()


# Interoperation with Python, both ways


def test_c_creates_and_python_attaches(clean_shm, probe, pylib, rundir):
    c = probe()
    assert c("init") == "0"
    handle = tuple(c.ints("create 128"))
    assert handle[0] == 2 and handle[1] >= 1024
    cid, rid = handle
    # The Python protocol's files, exactly.
    name = "%s%d.%d" % (shm_prefix(rundir), cid, rid)
    assert objects(rundir) == [name]
    st = os.stat(os.path.join(SHM_DIR, name))
    assert (stat.S_IMODE(st.st_mode), st.st_size) == (0o600, PAGE)
    with open(os.path.join(rundir, "c2", "%d.shm" % rid)) as f:
        assert f.read() == "128 %s\n" % name
    assert c("read %d %d 0 128" % handle) == "[]"  # starts zeroed
    assert c("write %d %d 0 fromC" % handle) == "ok"
    assert pylib.VMCISharedMem_Query(handle) == (VMCI_SUCCESS, 128)
    rv, view = pylib.VMCISharedMem_Attach(handle, 128)
    assert rv == VMCI_SUCCESS and len(view) == 128
    assert bytes(view[:6]) == b"fromC\0"
    # Zero copies: each side's stores show in the other's mapping, with no call in between.
    view[:6] = b"fromPy"
    assert c("read %d %d 0 128" % handle) == "[fromPy]"
    assert c("write %d %d 0 Again" % handle) == "ok"
    assert bytes(view[:6]) == b"Againy"
    # The creator detaches first: the region stays for Python, the last detach removes it.
    assert c("detach %d %d" % handle) == "0"
    assert c("detach %d %d" % handle) == str(VMCI_ERROR_NOT_FOUND)
    assert objects(rundir) == [name]
    assert c.ints("query %d %d" % handle) == [0, 128]
    del view
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert objects(rundir) == [] and markers(rundir) == []
    assert c.ints("query %d %d" % handle) == [VMCI_ERROR_NOT_FOUND, 0]


def test_python_creates_and_c_attaches(clean_shm, probe, pylib, rundir):
    handle, view = pylib.VMCISharedMem_Create(5000)
    view[:7] = b"fromPy\0"
    c = probe(cid=4)
    assert c("init /dev/vmci") == "0"
    assert c.ints("query %d %d" % handle) == [0, 5000]
    assert c.ints("attach %d %d 4999" % handle) == [VMCI_ERROR_INVALID_SIZE, 4999, 1]
    assert c.ints("attach %d %d 0" % handle) == [0, 5000, 0]  # 0 takes any size; written back
    assert c.ints("attach %d %d 5000" % handle) == [VMCI_ERROR_ALREADY_EXISTS, 5000, 1]
    assert c("read %d %d 0 5000" % handle) == "[fromPy]"
    assert c("write %d %d 4990 tail" % handle) == "ok"
    assert bytes(view[4990:4994]) == b"tail"
    view[:3] = b"xyz"
    assert c("read %d %d 0 3" % handle) == "[xyz]"
    # Python's creator detaches first; C's detach is the last and removes everything.
    del view
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert len(objects(rundir)) == 1
    assert c("detach %d %d" % handle) == "0"
    assert objects(rundir) == [] and markers(rundir) == []
    assert pylib.VMCISharedMem_Query(handle) == (VMCI_ERROR_NOT_FOUND, 0)


def test_one_id_space_for_c_regions_and_python_endpoints(clean_shm, probe, core, rundir):
    c = probe()
    assert c("init") == "0"
    first = tuple(c.ints("create 64"))
    lib = VMCILibrary(Runtime(make_settings(rundir, cid=2), core=core))
    assert lib.VMCI_InitApp(None) == VMCI_SUCCESS
    try:
        endpoint = lib.VMCIDatagram_CreateHnd(0)
        assert tuple(endpoint) == (2, first[1] + 1)
        second = tuple(c.ints("create 64"))
        assert second == (2, first[1] + 2)
        handle, _ = lib.VMCISharedMem_Create(64)
        assert tuple(handle) == (2, first[1] + 3)
        assert lib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    finally:
        lib.VMCI_CleanupApp()
    assert c("cleanup") == "ok"  # detaches both regions
    assert objects(rundir) == [] and markers(rundir) == []


def test_a_killed_creators_region_is_reclaimed(clean_shm, probe, pylib, rundir):
    c = probe()
    assert c("init") == "0"
    dead = tuple(c.ints("create 128"))
    c.proc.send_signal(signal.SIGKILL)
    c.proc.wait()
    assert len(objects(rundir)) == 1
    assert pylib.VMCISharedMem_Query(dead) == (VMCI_ERROR_NOT_FOUND, 0)
    again = probe()
    assert again("init") == "0"
    assert again.ints("query %d %d" % dead) == [VMCI_ERROR_NOT_FOUND, 0]
    assert again.ints("attach %d %d 0" % dead) == [VMCI_ERROR_NOT_FOUND, 0, 1]
    # The attach found nobody holding it and removed it; a C create sweeps the rest too.
    c2 = tuple(again.ints("create 128"))
    assert markers(rundir) == ["c2/%d.shm" % c2[1]]
    assert again("cleanup") == "ok"


# Error paths


def test_error_paths(clean_shm, probe, rundir):
    c = probe()
    unknown = "2 4000"
    for cmd in ("query " + unknown, "detach " + unknown):
        assert c.ints(cmd)[0] == VMCI_ERROR_UNAVAILABLE
    assert c.ints("attach %s 0" % unknown) == [VMCI_ERROR_UNAVAILABLE, 0, 1]
    assert c("create 128") == "invalid 1"
    assert c.ints("nulls " + unknown) == [1, VMCI_ERROR_UNAVAILABLE, VMCI_ERROR_UNAVAILABLE,
                                          VMCI_ERROR_UNAVAILABLE]
    assert c("init") == "0"
    assert c("create 0") == "invalid 1"
    assert c.ints("query " + unknown) == [VMCI_ERROR_NOT_FOUND, 0]
    assert c.ints("query 77 1024") == [VMCI_ERROR_NOT_FOUND, 0]  # no such context
    assert c.ints("query 4294967295 4294967295") == [VMCI_ERROR_NOT_FOUND, 0]
    assert c.ints("attach %s 0" % unknown) == [VMCI_ERROR_NOT_FOUND, 0, 1]
    assert c.ints("detach " + unknown) == [VMCI_ERROR_NOT_FOUND]
    assert c.ints("nulls " + unknown) == [1, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_INVALID_ARGS,
                                          VMCI_ERROR_INVALID_ARGS]
    handle = "%d %d" % tuple(c.ints("create 100"))
    assert c.ints("nulls " + handle) == [1, VMCI_ERROR_INVALID_ARGS, VMCI_ERROR_INVALID_ARGS,
                                         VMCI_ERROR_INVALID_ARGS]
    assert c.ints("attach %s 0" % handle) == [VMCI_ERROR_ALREADY_EXISTS, 0, 1]
    assert c.ints("attach %s 99" % handle) == [VMCI_ERROR_ALREADY_EXISTS, 99, 1]
    assert c.ints("query " + handle) == [0, 100]
    assert c("detach " + handle) == "0"
    assert c.ints("detach " + handle) == [VMCI_ERROR_NOT_FOUND]
    assert c.ints("query " + handle) == [VMCI_ERROR_NOT_FOUND, 0]
    # The size is checked against another process's region.
    other = probe(cid=3)
    assert other("init") == "0"
    handle = "%d %d" % tuple(other.ints("create 100"))
    assert c.ints("attach %s 101" % handle) == [VMCI_ERROR_INVALID_SIZE, 101, 1]
    assert c.ints("attach %s 4096" % handle) == [VMCI_ERROR_INVALID_SIZE, 4096, 1]  # not the backing
    assert c.ints("attach %s 100" % handle) == [0, 100, 0]
    # VMCI_CleanupApp detaches the library's regions; the calls are unavailable until InitApp.
    assert c("cleanup") == "ok"
    assert other("cleanup") == "ok"
    assert objects(rundir) == [] and markers(rundir) == []
    assert c.ints("query " + handle)[0] == VMCI_ERROR_UNAVAILABLE
    assert c.ints("detach " + handle) == [VMCI_ERROR_UNAVAILABLE]
    assert c("create 128") == "invalid 1"


def test_create_codes_and_no_allocation_when_too_large(clean_shm, cbuild, rundir):
    env = child_env(rundir, "pure", cid=2)
    result = subprocess.run([cbuild.shm_internal], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "zero=%d 1" % VMCI_ERROR_INVALID_SIZE,
        "fits=0", "detach=0",  # exactly the (pretended) free space
        "over=%d 1" % VMCI_ERROR_NO_MEM,
        "max=%d 1" % VMCI_ERROR_NO_MEM,
    ]
    assert os.listdir(os.path.join(rundir, "c2")) in ([".lock", ".next"], [".next", ".lock"])


def test_a_region_larger_than_dev_shm_is_no_mem(clean_shm, probe, rundir):
    st = os.statvfs(SHM_DIR)
    if st.f_bavail * st.f_frsize >= 0xFFFFFFFF:
        pytest.skip("/dev/shm has room for 4 GiB here (the internal test pretends it has not)")
    c = probe()
    assert c("init") == "0"
    assert c("create 4294967295") == "invalid 1"
    assert objects(rundir) == []


# fork() and threads


def test_fork_child_forgets_the_parents_regions(clean_shm, probe, rundir):
    c = probe()
    assert c("init") == "0"
    handle = "%d %d" % tuple(c.ints("create 64"))
    assert c("write %s 0 parent" % handle) == "ok"
    # The child: Detach NOT_FOUND, Query/Attach/Detach of its own work, the region untouched.
    assert c("fork " + handle) == "0"
    assert c("read %s 0 64" % handle) == "[child!]"
    assert c.ints("query " + handle) == [0, 64]
    assert c("detach " + handle) == "0"
    assert objects(rundir) == []


def test_threads(clean_shm, probe, pylib, rundir):
    handle, view = pylib.VMCISharedMem_Create(8)
    view[0] = 0
    c = probe()
    assert c("init") == "0"
    assert c("threads %d %d" % tuple(handle)) == "0"
    assert c.ints("query %d %d" % tuple(handle)) == [0, 8]
    assert 1 <= view[0] <= 100  # at least one thread had it at a time, at most one each round
    del view
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    assert markers(rundir) == []


# sharedMemApp (vmci-sdk.md 7.2) in C


def c_app(cbuild, args):
    return RUN + ["--", cbuild.sharedMemApp] + args


@pytest.mark.parametrize("args", [[], ["-s", "-c"], ["-h"], ["-c", "extra"]])
def test_c_usage(cbuild, rundir, args):
    result = subprocess.run(c_app(cbuild, args), env=env_for(rundir, "pure", cbuild.library),
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout, result.stderr) == (255, "", USAGE)


def test_c_client_without_a_server_and_with_a_wrong_size(clean_shm, cbuild, pylib, rundir, core):
    env = env_for(rundir, core.NAME, cbuild.library, cid=4)
    late = subprocess.run(c_app(cbuild, ["-c"]), env=env, capture_output=True, text=True, timeout=60)
    assert (late.returncode, late.stdout, late.stderr) == (0, "", "Failed to lookup in discovery service.\n")
    handle, _ = pylib.VMCISharedMem_Create(64)
    assert pylib.VMCIDs_Register("HOST TIME", handle) == VMCI_SUCCESS
    wrong = subprocess.run(c_app(cbuild, ["-c"]), env=env, capture_output=True, text=True, timeout=60)
    assert (wrong.returncode, wrong.stdout) == (0, "")
    assert wrong.stderr == "Got wrong size of shared memory region.\nShould be 128, got 64\n"
    assert pylib.VMCIDs_Unregister("HOST TIME") == VMCI_SUCCESS
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS


def check_client(result):
    assert (result.returncode, result.stderr) == (0, "")
    readings = result.stdout.split("\n")
    assert len(readings) == 4 and readings[3] == ""
    assert all(READING.fullmatch(r) for r in readings[:3]), readings
    assert readings[0] != readings[2]  # the server writes every second


def serve(server_cmd, server_env, clients, rundir, core, registered=None):
    """A sharedMemApp server and clients [(cmd, env)] one after the other while it runs, once
    ``registered()`` returns (default: the name is found on the local transport)."""
    server = subprocess.Popen(server_cmd, env=server_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout.readline() == "Running shared memory server for 10 seconds.\n"
        (registered or (lambda: wait_registered(rundir, core, "HOST TIME")))()
        started = time.monotonic()
        for cmd, env in clients:
            client = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            check_client(client)
        assert time.monotonic() - started >= 3 * len(clients) - 0.5
        out, err = server.communicate(timeout=30)
        assert (server.returncode, out, err) == (0, "", "0.1.2.3.4.5.6.7.8.9.\n")
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert objects(rundir) == [] and markers(rundir) == []


@pytest.mark.slow
def test_c_server_with_c_and_python_clients(clean_shm, cbuild, rundir, core):
    serve(c_app(cbuild, ["-s"]), env_for(rundir, core.NAME, cbuild.library, cid=2),
          [(c_app(cbuild, ["-c", "-d", "/dev/vmci"]), env_for(rundir, core.NAME, cbuild.library, cid=3)),
           (PY_APP + ["-c"], child_env(rundir, core.NAME, cid=4))], rundir, core)


@pytest.mark.slow
def test_python_server_with_a_c_client(clean_shm, cbuild, rundir, core):
    serve(PY_APP + ["-s"], child_env(rundir, core.NAME, cid=2),
          [(c_app(cbuild, ["-c"]), env_for(rundir, core.NAME, cbuild.library, cid=3))], rundir, core)


# Sanitizers


@pytest.mark.slow
def test_under_address_and_undefined_behaviour_sanitizers(clean_shm, tmp_path, probe, pylib, rundir):
    reason = _sanitizers_work(str(tmp_path))
    if reason:
        pytest.skip(reason)
    sb = build(str(tmp_path), SANITIZE)
    c = probe(build=sb, **SANITIZER_ENV)
    assert c("init") == "0"
    assert c("create 0") == "invalid 1"
    mine = "%d %d" % tuple(c.ints("create 300"))
    assert c("write %s 0 parent" % mine) == "ok"
    handle, view = pylib.VMCISharedMem_Create(8)
    theirs = "%d %d" % tuple(handle)
    assert c.ints("attach %s 7" % theirs) == [VMCI_ERROR_INVALID_SIZE, 7, 1]
    assert c.ints("attach %s 0" % theirs) == [0, 8, 0]
    assert c("write %s 0 12345678" % theirs) == "ok"
    assert bytes(view) == b"12345678"
    assert c("detach %s" % theirs) == "0"
    assert c.ints("nulls " + mine) == [1, -2, -2, -2]
    assert c("fork " + mine) == "0"
    assert c("read %s 0 300" % mine) == "[child!]"
    assert c("threads " + theirs) == "0"
    assert c.ints("detach 2 5000") == [VMCI_ERROR_NOT_FOUND]
    assert c("cleanup") == "ok"
    del view
    assert pylib.VMCISharedMem_Detach(handle) == VMCI_SUCCESS
    err = c.close()
    assert not [m for m in SANITIZER_MARKS if m in err], err
    assert err == ""
