//! The thin unsafe layer: TUN device, raw IP sockets, batched `recvmmsg`/`sendmmsg`, the socket
//! error queue, interface ioctls, `poll` and an eventfd. Everything above it is safe code.
//!
//! Each function wraps one system call or one fixed structure; the pointers handed to the kernel
//! always point at locals or at slices that outlive the call.

use std::ffi::CStr;
use std::io;
use std::mem::{self, MaybeUninit};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Packets per `recvmmsg`/`sendmmsg` call.
pub(crate) const BATCH: usize = 32;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

fn ifreq_for(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data (arrays, integers and unions of them); all-zero is valid.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must be 1-15 bytes",
        ));
    }
    for (dst, &b) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = b as libc::c_char;
    }
    Ok(req)
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value points at a live c_int and its exact size is passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// An open TUN device (IFF_TUN | IFF_NO_PI: bare IP packets), non-blocking.
#[derive(Debug)]
pub(crate) struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`.
    pub(crate) fn open(name: &str) -> io::Result<Self> {
        let path = c"/dev/net/tun";
        // SAFETY: path is a valid NUL-terminated string; the returned fd is checked below.
        let raw = check(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: raw is a freshly opened descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = ifreq_for(name)?;
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives on our stack for the call.
        check(unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                libc::TUNSETIFF,
                &mut req as *mut libc::ifreq,
            )
        })?;
        // SAFETY: the kernel wrote a NUL-terminated name into ifr_name (IFNAMSIZ bytes).
        let actual = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Self { fd, name: actual })
    }

    /// The interface name the kernel gave.
    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Reads one packet; `WouldBlock` when none is queued.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid writable region of buf.len() bytes for the duration of the call.
        check_size(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
    }

    /// Writes one packet.
    pub(crate) fn write(&self, packet: &[u8]) -> io::Result<usize> {
        // SAFETY: packet is a valid readable region of packet.len() bytes for the call.
        check_size(unsafe {
            libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len())
        })
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Configures an interface: IPv4 address and prefix, MTU, and up.
pub(crate) fn configure_interface(
    name: &str,
    addr: Ipv4Addr,
    prefix_len: u8,
    mtu: u16,
) -> io::Result<()> {
    let ctl = control_socket()?;
    let fd = ctl.as_raw_fd();
    let mut req = ifreq_for(name)?;
    let sa = sockaddr_v4(addr);
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; we copy the bytes of one
    // into the union field of the other.
    req.ifr_ifru.ifru_addr = unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sa) };
    // SAFETY: SIOCSIFADDR reads one ifreq that lives on our stack for the call.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &mut req as *mut libc::ifreq) })?;
    let mask = if prefix_len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix_len.min(32)))
    };
    let sa = sockaddr_v4(Ipv4Addr::from(mask));
    // SAFETY: as above, same-size plain-data reinterpretation.
    req.ifr_ifru.ifru_netmask = unsafe { mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sa) };
    // SAFETY: SIOCSIFNETMASK reads one ifreq that lives on our stack for the call.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &mut req as *mut libc::ifreq) })?;
    set_mtu_with(fd, name, mtu)?;
    let mut req = ifreq_for(name)?;
    // SAFETY: SIOCGIFFLAGS writes the flags into the ifreq on our stack.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req as *mut libc::ifreq) })?;
    // SAFETY: the kernel just filled ifru_flags, so reading that union field is valid.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads one ifreq on our stack.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &mut req as *mut libc::ifreq) })?;
    Ok(())
}

/// Sets an interface's MTU.
pub(crate) fn set_mtu(name: &str, mtu: u16) -> io::Result<()> {
    let ctl = control_socket()?;
    set_mtu_with(ctl.as_raw_fd(), name, mtu)
}

fn set_mtu_with(fd: RawFd, name: &str, mtu: u16) -> io::Result<()> {
    let mut req = ifreq_for(name)?;
    req.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
    // SAFETY: SIOCSIFMTU reads one ifreq on our stack.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFMTU, &mut req as *mut libc::ifreq) })?;
    Ok(())
}

fn control_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked.
    let raw =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// One received datagram slot for [`RawSocket::recv_batch`].
pub(crate) struct RecvSlot {
    /// The packet buffer.
    pub(crate) buf: Vec<u8>,
    /// Bytes received into it by the last batch.
    pub(crate) len: usize,
}

/// An error-queue report: the destination a send was for and, for fragmentation-needed (from a
/// router or from the local link), the MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ErrorReport {
    /// The original destination.
    pub(crate) dst: Ipv4Addr,
    /// Path MTU, when the error is "message too big".
    pub(crate) mtu: Option<u16>,
}

/// A raw IPv4 socket for one protocol, bound to the management address, sending complete IPv4
/// headers (IP_HDRINCL: the AH ICV covers the header), with PMTU discovery on and errors queued.
#[derive(Debug)]
pub(crate) struct RawSocket {
    fd: OwnedFd,
}

impl RawSocket {
    /// Opens and binds the socket.
    pub(crate) fn open(protocol: u8, local: Ipv4Addr, buffer_bytes: usize) -> io::Result<Self> {
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = check(unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::c_int::from(protocol),
            )
        })?;
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let s = fd.as_raw_fd();
        set_int_opt(s, libc::IPPROTO_IP, libc::IP_HDRINCL, 1)?;
        set_int_opt(
            s,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )?;
        set_int_opt(s, libc::IPPROTO_IP, libc::IP_RECVERR, 1)?;
        let size = libc::c_int::try_from(buffer_bytes).unwrap_or(libc::c_int::MAX);
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            if set_int_opt(s, libc::SOL_SOCKET, force, size).is_err() {
                set_int_opt(s, libc::SOL_SOCKET, plain, size)?;
            }
        }
        let addr = sockaddr_v4(local);
        // SAFETY: addr is a live sockaddr_in and its exact size is passed.
        check(unsafe {
            libc::bind(
                s,
                (&addr as *const libc::sockaddr_in).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        })?;
        Ok(Self { fd })
    }

    /// Receives up to `slots.len()` (at most [`BATCH`]) packets without blocking; returns how many
    /// slots were filled (`WouldBlock` when none was queued).
    pub(crate) fn recv_batch(&self, slots: &mut [RecvSlot]) -> io::Result<usize> {
        let n = slots.len().min(BATCH);
        // SAFETY: iovec and mmsghdr are plain data; all-zero is a valid empty value.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for i in 0..n {
            iovs[i] = libc::iovec {
                iov_base: slots[i].buf.as_mut_ptr().cast(),
                iov_len: slots[i].buf.len(),
            };
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each message points at one iovec above, each iovec at a distinct live buffer
        // of the stated length; no addresses or control data are requested.
        let got = check(unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        })? as usize;
        for i in 0..got.min(n) {
            slots[i].len = msgs[i].msg_len as usize;
        }
        Ok(got.min(n))
    }

    /// Sends `packets` (complete IPv4 packets with their destinations) with as few `sendmmsg`
    /// calls as possible. Returns how many were sent before the first error, and that error.
    pub(crate) fn send_batch(&self, packets: &[(Ipv4Addr, &[u8])]) -> (usize, Option<io::Error>) {
        let n = packets.len().min(BATCH);
        let mut addrs = [sockaddr_v4(Ipv4Addr::UNSPECIFIED); BATCH];
        // SAFETY: plain data; all-zero is valid.
        let mut iovs: [libc::iovec; BATCH] = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { mem::zeroed() };
        for (i, (dst, data)) in packets.iter().take(n).enumerate() {
            addrs[i] = sockaddr_v4(*dst);
            iovs[i] = libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            msgs[i].msg_hdr.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: messages sent..n point at live addresses and iovecs above, which point at
            // the caller's packet slices; the kernel only reads the packet data.
            let ret = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs[sent..].as_mut_ptr(),
                    (n - sent) as libc::c_uint,
                    0,
                )
            };
            match check(ret) {
                Ok(0) => break,
                Ok(k) => sent += k as usize,
                Err(e) => return (sent, Some(e)),
            }
        }
        (sent, None)
    }

    /// Takes one report from the socket's error queue (`WouldBlock` when empty). Reports other
    /// than "message too big" come back with `mtu: None`.
    pub(crate) fn recv_error(&self) -> io::Result<ErrorReport> {
        let mut addr = sockaddr_v4(Ipv4Addr::UNSPECIFIED);
        let mut data = [0u8; 576];
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // Room for one IP_RECVERR control message (sock_extended_err plus the offender address).
        let mut control = [MaybeUninit::<u64>::uninit(); 16];
        // SAFETY: msghdr is plain data; all-zero is valid.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_name = (&mut addr as *mut libc::sockaddr_in).cast();
        msg.msg_namelen = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&control);
        // SAFETY: every pointer in msg refers to a live local of the stated size.
        check_size(unsafe {
            libc::recvmsg(
                self.fd.as_raw_fd(),
                &mut msg,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        })?;
        let dst = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        let mut mtu = None;
        // SAFETY: msg was filled by recvmsg; CMSG_FIRSTHDR/CMSG_NXTHDR stay within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and inside the control buffer, as CMSG_* guarantee.
            let header = unsafe { &*cmsg };
            if header.cmsg_level == libc::IPPROTO_IP && header.cmsg_type == libc::IP_RECVERR {
                // SAFETY: an IP_RECVERR message carries a sock_extended_err; read_unaligned
                // because the control buffer gives no alignment guarantee for it.
                let err: libc::sock_extended_err =
                    unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
                let too_big = err.ee_errno == libc::EMSGSIZE as u32;
                let origin_ok = err.ee_origin == libc::SO_EE_ORIGIN_ICMP
                    || err.ee_origin == libc::SO_EE_ORIGIN_LOCAL;
                if too_big && origin_ok {
                    mtu = Some(u16::try_from(err.ee_info).unwrap_or(u16::MAX));
                }
            }
            // SAFETY: as above, stays within the buffer the kernel filled.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        Ok(ErrorReport { dst, mtu })
    }
}

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// An eventfd that wakes a worker blocked in [`poll`] (configuration change or shutdown).
#[derive(Debug)]
pub(crate) struct Waker {
    fd: OwnedFd,
}

impl Waker {
    /// A new, unsignalled waker.
    pub(crate) fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2) call; the result is checked.
        let raw = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: raw is a fresh descriptor owned by nobody else.
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(raw) },
        })
    }

    /// Signals the waker.
    pub(crate) fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64, as eventfd requires. A full counter
        // (EAGAIN) already means "signalled", so the result is ignored.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Clears the signal.
    pub(crate) fn reset(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; EAGAIN when unsignalled is fine.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }
}

impl AsRawFd for Waker {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Readiness of one descriptor after [`poll`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Ready {
    /// Data to read.
    pub(crate) readable: bool,
    /// An error is queued (POLLERR: the error queue has reports).
    pub(crate) error: bool,
}

/// Waits until one of `fds` is readable or has an error, or `timeout` passes.
pub(crate) fn poll<const N: usize>(
    fds: [RawFd; N],
    timeout: Option<Duration>,
) -> io::Result<[Ready; N]> {
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let ms = match timeout {
        None => -1,
        Some(t) => libc::c_int::try_from(
            t.as_millis()
                .saturating_add(u128::from(t.subsec_nanos() % 1_000_000 != 0)),
        )
        .unwrap_or(libc::c_int::MAX),
    };
    // SAFETY: pfds is a live array of N pollfd structures.
    let ret = unsafe { libc::poll(pfds.as_mut_ptr(), N as libc::nfds_t, ms) };
    if ret < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok([Ready::default(); N]);
        }
        return Err(e);
    }
    Ok(pfds.map(|p| Ready {
        readable: p.revents & (libc::POLLIN | libc::POLLHUP) != 0,
        error: p.revents & libc::POLLERR != 0,
    }))
}
