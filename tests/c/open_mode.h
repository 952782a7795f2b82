/* For the tests' open() interposers (no_vsock_shim.c, vsock_emulation.c): the mode argument of
 * open(path, flags, ...), read only when flags say one was passed. */
#ifndef OPEN_MODE_H
#define OPEN_MODE_H

#include <fcntl.h>
#include <stdarg.h>

#define OPEN_MODE(flags, mode)                              \
    do {                                                    \
        if ((flags) & (O_CREAT | __O_TMPFILE)) {            \
            va_list ap_;                                    \
            va_start(ap_, flags);                           \
            (mode) = va_arg(ap_, mode_t);                   \
            va_end(ap_);                                    \
        }                                                   \
    } while (0)

#endif
