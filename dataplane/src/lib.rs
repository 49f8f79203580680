//! User-space IPsec for confmesh: AH (RFC 4302) and ESP-GCM (RFC 4303/4106) in tunnel mode.
//!
//! The SA processing is a sans-IO core that works on caller-owned buffers; the raw-socket and TUN
//! I/O that turns it into the overlay between peers lives beside it, apart from the core.
