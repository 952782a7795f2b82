/*
 * vsockcompat C core: the discovery-service client (vsockcompat/ds_client.py, in C).
 *
 * Each call validates the name (NULL, or over VMCI_DS_MAX_NAME_LEN bytes:
 * VMCI_ERROR_INVALID_ARGS without contacting the daemon), creates a temporary
 * endpoint, sends one request (vmci-sdk.md 3.3) to (1, 1) with a msgid from a
 * process-wide counter starting at 0, waits up to VSC_DS_REPLY_TIMEOUT_MS for
 * the reply from (1, 1) carrying that msgid (others are ignored), destroys the
 * endpoint and returns the reply's code. No reply: VMCI_ERROR_TIMEOUT; a reply
 * over 300 bytes: VMCI_ERROR_PAYLOAD_TOO_LARGE; another malformed reply:
 * VMCI_ERROR_GENERIC.
 *
 * If (1, 1) is unreachable and autostart is on (on the local and hybrid
 * transports; over vsock never), the daemon is started once
 * (serialised on <rundir>/ds.spawn.lock): $VSOCKCOMPAT_PYTHON (default
 * python3) -m vsockcompat ds --idle-exit 60 --quiet, in a new session, stdin
 * and stdout on /dev/null, stderr appended to <rundir>/ds.log, cwd /, without
 * LD_PRELOAD, and with the package's parent directory on PYTHONPATH when this
 * library lives at <parent>/vsockcompat/lib/; on hybrid with our VMM sockets
 * (VSOCKCOMPAT_HYBRID_UDS as absolute paths, VSOCKCOMPAT_HYBRID_CID), and
 * alive once a socket listens at one of <uds>_1.host. It is started through an
 * intermediate child, so it is never the program's child (no zombie, no
 * surprise status for the program's wait()). The call then waits up to
 * VSC_DS_SPAWN_TIMEOUT_MS for (1, 1) to be alive and sends once more.
 */
#ifndef VSC_DS_H
#define VSC_DS_H

#include "vsc_local.h"

#define VSC_DS_REPLY_TIMEOUT_MS 10000
#define VSC_DS_SPAWN_TIMEOUT_MS 30000 /* a bound, not a delay: as ds_client.SPAWN_TIMEOUT */

/* action: VMCI_DS_ACTION_*; *out (may be NULL) gets the reply's handle on success, else invalid. */
int vsc_ds_call(const vsc_local *t, int action, const char *name, vsc_handle handle, vsc_handle *out);

#define VSC_DS_NOT_MINE (-2100) /* a reply to another request: keep waiting */
/* Check a reply payload of n bytes for request msgid: its code (with *out set on
 * VMCI_SUCCESS), VSC_DS_NOT_MINE, or VMCI_ERROR_PAYLOAD_TOO_LARGE / _GENERIC if malformed. */
int vsc_ds_parse_reply(const uint8_t *buf, size_t n, uint32_t msgid, vsc_handle *out);

#endif
