"""The libslirp binding: cffi ABI mode on `libslirp.so.0` (no compiler needed at install or run time).

The declarations follow `<slirp/libslirp.h>` of libslirp 4.7.0, whose `SLIRP_CONFIG_VERSION_MAX` is 4: SlirpConfig
and SlirpCb are declared up to the fields of config version 4 (`disable_dhcp`; `init_completed`,
`timer_new_opaque`). A newer library reads only the fields of the version we pass; an older one gets the highest
version it knows (the first release of each: libslirp CHANGELOG.md — 4.1.0 `slirp_new` (1), 4.2.0 `outbound_addr`
(2), 4.3.0 `disable_dns` (3), 4.7.0 `disable_dhcp` and `timer_new_opaque` (4)). tests/net checks these layouts
against the installed header with a C compiler when one is there."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

from cffi import FFI

from ..errors import CloudkvmError

LIBRARY = "libslirp.so.0"
HEADER_CONFIG_VERSION = 4  # SLIRP_CONFIG_VERSION_MAX of the libslirp.h (4.7.0) declared below
# (first libslirp release, SlirpConfig version it introduced) -- libslirp CHANGELOG.md
CONFIG_VERSIONS = (((4, 7), 4), ((4, 3), 3), ((4, 2), 2), ((4, 1), 1))
INSTALL_HINT = "Debian/Ubuntu: apt-get install libslirp0; Fedora: dnf install libslirp"

CDEF = """
typedef struct Slirp Slirp;
struct in_addr { uint32_t s_addr; };
struct in6_addr { union { uint8_t u6_addr8[16]; uint16_t u6_addr16[8]; uint32_t u6_addr32[4]; } in6_u; };
struct sockaddr_in;
struct sockaddr_in6;

enum {
    SLIRP_POLL_IN = 1,
    SLIRP_POLL_OUT = 2,
    SLIRP_POLL_PRI = 4,
    SLIRP_POLL_ERR = 8,
    SLIRP_POLL_HUP = 16,
};

typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef enum SlirpTimerId { SLIRP_TIMER_RA = 0, SLIRP_TIMER_NUM = 1 } SlirpTimerId;

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    /* version 4 */
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(SlirpTimerId id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    /* version 1 */
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    /* version 2 */
    struct sockaddr_in *outbound_addr;
    struct sockaddr_in6 *outbound_addr6;
    /* version 3 */
    bool disable_dns;
    /* version 4 */
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const char *pkt, int pkt_len);  /* const uint8_t *: bytes pass as they are */
void slirp_handle_timer(Slirp *slirp, SlirpTimerId id, void *cb_opaque);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
int slirp_remove_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port);
char *slirp_connection_info(Slirp *slirp);
const char *slirp_version_string(void);
void free(void *ptr);
"""

ffi = FFI()
ffi.cdef(CDEF)


@dataclass(frozen=True)
class Libslirp:
    lib: object            # the dlopen'ed library
    version: str           # slirp_version_string()
    config_version: int    # the SlirpConfig version we pass (highest both the header and the library know)


def parse_version(text: str) -> tuple[int, int, int]:
    match = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise CloudkvmError(f"cannot read the libslirp version '{text}'", INSTALL_HINT)
    return int(match[1]), int(match[2]), int(match[3] or 0)


def config_version_for(version: str) -> int:
    """The SlirpConfig version to use with libslirp `version`; CloudkvmError when it is older than 4.1."""
    major_minor = parse_version(version)[:2]
    for first_release, config_version in CONFIG_VERSIONS:
        if major_minor >= first_release:
            return min(config_version, HEADER_CONFIG_VERSION)
    raise CloudkvmError(f"libslirp {version} is too old, need 4.1 or newer (4.7 preferred)",
                        f"install a newer libslirp0 ({INSTALL_HINT})")


_loaded: Libslirp | None = None
_lock = threading.Lock()


def load(name: str = LIBRARY) -> Libslirp:
    """dlopen libslirp once (per name) and pick the SlirpConfig version; CloudkvmError when it is missing or old."""
    global _loaded
    with _lock:
        if _loaded is not None and name == LIBRARY:
            return _loaded
        try:
            lib = ffi.dlopen(name)
        except OSError:
            raise CloudkvmError(f"libslirp0 is not installed (cannot load {name}): apt-get install libslirp0",
                                f"user networking needs libslirp 4.1 or newer; {INSTALL_HINT}") from None
        try:
            version = ffi.string(lib.slirp_version_string()).decode("ascii", "replace")
        except AttributeError:
            raise CloudkvmError(f"{name} is not a usable libslirp (no slirp_version_string)", INSTALL_HINT) from None
        loaded = Libslirp(lib, version, config_version_for(version))
        if name == LIBRARY:
            _loaded = loaded
        return loaded
