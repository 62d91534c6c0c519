//! Verbs (RDMA) device discovery, with libibverbs loaded at run time.
//!
//! As brpc and NCCL do, `libibverbs.so.1` is `dlopen`ed rather than linked, so
//! one `quiver` binary builds with plain `cargo build` and runs anywhere: with
//! RDMA where a device answers, over TCP otherwise. The declarations below are
//! our own `repr(C)` copies of the few rdma-core structures and functions this
//! module uses (rdma-core's `verbs.h`, ABI version 1.1 symbols).
//!
//! Here: listing devices, ports, their state and GIDs, so `quiver fabric
//! devices` and `--transport auto` can say what they found and why they fall
//! back; [`rc`], RC queue pairs with SEND/RECV and RDMA READ/WRITE, shared
//! receive queues and completion channels; and [`port`], how a worker runs
//! the fabric protocol over them.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::sync::OnceLock;

pub mod port;
pub mod rc;

/// Why verbs cannot be used on this machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerbsUnavailable {
    #[error("libibverbs.so.1 cannot be loaded ({0}); install rdma-core's libibverbs1 and a provider (ibverbs-providers)")]
    NoLibrary(String),
    #[error("libibverbs lacks {0}")]
    MissingSymbol(&'static str),
    #[error(
        "no RDMA device found (no NIC with RDMA, and no rxe/siw link; see soft-roce/host-setup.sh)"
    )]
    NoDevice,
    #[error("{device}: {call} failed: {error}")]
    Call {
        device: String,
        call: &'static str,
        error: String,
    },
}

// --- our declarations of rdma-core's ABI ------------------------------------

/// `struct ibv_device_attr` (verbs.h).
#[repr(C)]
struct IbvDeviceAttr {
    fw_ver: [c_char; 64],
    node_guid: u64,
    sys_image_guid: u64,
    max_mr_size: u64,
    page_size_cap: u64,
    vendor_id: u32,
    vendor_part_id: u32,
    hw_ver: u32,
    max_qp: c_int,
    max_qp_wr: c_int,
    device_cap_flags: u32,
    max_sge: c_int,
    max_sge_rd: c_int,
    max_cq: c_int,
    max_cqe: c_int,
    max_mr: c_int,
    max_pd: c_int,
    max_qp_rd_atom: c_int,
    max_ee_rd_atom: c_int,
    max_res_rd_atom: c_int,
    max_qp_init_rd_atom: c_int,
    max_ee_init_rd_atom: c_int,
    atomic_cap: c_int,
    max_ee: c_int,
    max_rdd: c_int,
    max_mw: c_int,
    max_raw_ipv6_qp: c_int,
    max_raw_ethy_qp: c_int,
    max_mcast_grp: c_int,
    max_mcast_qp_attach: c_int,
    max_total_mcast_qp_attach: c_int,
    max_ah: c_int,
    max_fmr: c_int,
    max_map_per_fmr: c_int,
    max_srq: c_int,
    max_srq_wr: c_int,
    max_srq_sge: c_int,
    max_pkeys: u16,
    local_ca_ack_delay: u8,
    phys_port_cnt: u8,
}

/// `struct ibv_port_attr` (verbs.h), as far as the exported `ibv_query_port`
/// (the compat entry point) fills it; padded so a newer library writing a few
/// more bytes cannot overrun it.
#[repr(C)]
struct IbvPortAttr {
    state: c_int,
    max_mtu: c_int,
    active_mtu: c_int,
    gid_tbl_len: c_int,
    port_cap_flags: u32,
    max_msg_sz: u32,
    bad_pkey_cntr: u32,
    qkey_viol_cntr: u32,
    pkey_tbl_len: u16,
    lid: u16,
    sm_lid: u16,
    lmc: u8,
    max_vl_num: u8,
    sm_sl: u8,
    subnet_timeout: u8,
    init_type_reply: u8,
    active_width: u8,
    active_speed: u8,
    phys_state: u8,
    link_layer: u8,
    flags: u8,
    port_cap_flags2: u16,
    // Newer rdma-core appends fields (active_speed_ex); the padding absorbs them.
    _reserved: [u8; 64],
}

/// `union ibv_gid`.
#[repr(C)]
#[derive(Clone, Copy)]
struct IbvGid([u8; 16]);

type GetDeviceList = unsafe extern "C" fn(*mut c_int) -> *mut *mut c_void;
type FreeDeviceList = unsafe extern "C" fn(*mut *mut c_void);
type GetDeviceName = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type OpenDevice = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
type CloseDevice = unsafe extern "C" fn(*mut c_void) -> c_int;
type QueryDevice = unsafe extern "C" fn(*mut c_void, *mut IbvDeviceAttr) -> c_int;
type QueryPort = unsafe extern "C" fn(*mut c_void, u8, *mut IbvPortAttr) -> c_int;
type QueryGid = unsafe extern "C" fn(*mut c_void, u8, c_int, *mut IbvGid) -> c_int;
type AllocPd = unsafe extern "C" fn(*mut c_void) -> *mut c_void;
type Release = unsafe extern "C" fn(*mut c_void) -> c_int;
type RegMr = unsafe extern "C" fn(*mut c_void, *mut c_void, usize, c_int) -> *mut c_void;
type CreateCq =
    unsafe extern "C" fn(*mut c_void, c_int, *mut c_void, *mut c_void, c_int) -> *mut c_void;
type CreateQp = unsafe extern "C" fn(*mut c_void, *mut rc::IbvQpInitAttr) -> *mut c_void;
type ModifyQp = unsafe extern "C" fn(*mut c_void, *mut rc::IbvQpAttr, c_int) -> c_int;
type CreateSrq = unsafe extern "C" fn(*mut c_void, *mut rc::IbvSrqInitAttr) -> *mut c_void;
type GetCqEvent = unsafe extern "C" fn(*mut c_void, *mut *mut c_void, *mut *mut c_void) -> c_int;
type AckCqEvents = unsafe extern "C" fn(*mut c_void, u32);

/// The functions we use, resolved once.
struct Lib {
    get_device_list: GetDeviceList,
    free_device_list: FreeDeviceList,
    get_device_name: GetDeviceName,
    open_device: OpenDevice,
    close_device: CloseDevice,
    query_device: QueryDevice,
    query_port: QueryPort,
    query_gid: QueryGid,
    alloc_pd: AllocPd,
    dealloc_pd: Release,
    reg_mr: RegMr,
    dereg_mr: Release,
    create_cq: CreateCq,
    destroy_cq: Release,
    create_qp: CreateQp,
    destroy_qp: Release,
    modify_qp: ModifyQp,
    create_srq: CreateSrq,
    destroy_srq: Release,
    create_comp_channel: AllocPd,
    destroy_comp_channel: Release,
    get_cq_event: GetCqEvent,
    ack_cq_events: AckCqEvents,
}

fn lib() -> Result<&'static Lib, VerbsUnavailable> {
    static LIB: OnceLock<Result<Lib, VerbsUnavailable>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Lib, VerbsUnavailable> {
    // SAFETY: dlopen with a constant, NUL-terminated name; the handle is kept
    // for the life of the process (never dlclosed), so symbols stay valid.
    let handle = unsafe {
        libc::dlopen(
            c"libibverbs.so.1".as_ptr(),
            libc::RTLD_NOW | libc::RTLD_LOCAL,
        )
    };
    if handle.is_null() {
        // SAFETY: dlerror returns a thread-local C string or null.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null C string from dlerror.
            unsafe { CStr::from_ptr(why) }
                .to_string_lossy()
                .into_owned()
        };
        return Err(VerbsUnavailable::NoLibrary(why));
    }
    macro_rules! sym {
        ($name:literal, $ty:ty) => {{
            // SAFETY: a valid handle and a NUL-terminated name.
            let p = unsafe { libc::dlsym(handle, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(VerbsUnavailable::MissingSymbol($name));
            }
            // SAFETY: the symbol is the C function whose signature we declare.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(p) }
        }};
    }
    Ok(Lib {
        get_device_list: sym!("ibv_get_device_list", GetDeviceList),
        free_device_list: sym!("ibv_free_device_list", FreeDeviceList),
        get_device_name: sym!("ibv_get_device_name", GetDeviceName),
        open_device: sym!("ibv_open_device", OpenDevice),
        close_device: sym!("ibv_close_device", CloseDevice),
        query_device: sym!("ibv_query_device", QueryDevice),
        query_port: sym!("ibv_query_port", QueryPort),
        query_gid: sym!("ibv_query_gid", QueryGid),
        alloc_pd: sym!("ibv_alloc_pd", AllocPd),
        dealloc_pd: sym!("ibv_dealloc_pd", Release),
        reg_mr: sym!("ibv_reg_mr", RegMr),
        dereg_mr: sym!("ibv_dereg_mr", Release),
        create_cq: sym!("ibv_create_cq", CreateCq),
        destroy_cq: sym!("ibv_destroy_cq", Release),
        create_qp: sym!("ibv_create_qp", CreateQp),
        destroy_qp: sym!("ibv_destroy_qp", Release),
        modify_qp: sym!("ibv_modify_qp", ModifyQp),
        create_srq: sym!("ibv_create_srq", CreateSrq),
        destroy_srq: sym!("ibv_destroy_srq", Release),
        create_comp_channel: sym!("ibv_create_comp_channel", AllocPd),
        destroy_comp_channel: sym!("ibv_destroy_comp_channel", Release),
        get_cq_event: sym!("ibv_get_cq_event", GetCqEvent),
        ack_cq_events: sym!("ibv_ack_cq_events", AckCqEvents),
    })
}

/// A port's state, as `ibv_port_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    Other(i32),
}

impl PortState {
    fn from_raw(v: c_int) -> PortState {
        match v {
            1 => PortState::Down,
            2 => PortState::Init,
            3 => PortState::Armed,
            4 => PortState::Active,
            other => PortState::Other(other),
        }
    }
}

/// One GID table entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Gid(pub [u8; 16]);

impl Gid {
    /// The IPv4 address of an IPv4-mapped GID (`::ffff:a.b.c.d`, RoCE v2).
    pub fn ipv4(&self) -> Option<std::net::Ipv4Addr> {
        let g = &self.0;
        (g[..10].iter().all(|&b| b == 0) && g[10] == 0xff && g[11] == 0xff)
            .then(|| std::net::Ipv4Addr::new(g[12], g[13], g[14], g[15]))
    }

    fn is_zero(&self) -> bool {
        self.0.iter().all(|&b| b == 0)
    }
}

impl fmt::Display for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::Ipv6Addr::from(self.0).fmt(f)
    }
}

impl fmt::Debug for Gid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gid({self})")
    }
}

#[derive(Debug, Clone)]
pub struct PortInfo {
    pub port: u8,
    pub state: PortState,
    /// Active MTU in bytes.
    pub active_mtu: u32,
    /// 1 InfiniBand, 2 Ethernet (RoCE).
    pub link_layer: u8,
    /// Non-zero GID table entries: (index, gid).
    pub gids: Vec<(u32, Gid)>,
}

impl PortInfo {
    /// The GID index to use: the first IPv4-mapped entry (RoCE v2), else index 0.
    pub fn preferred_gid_index(&self) -> Option<u32> {
        self.gids
            .iter()
            .find(|(_, g)| g.ipv4().is_some())
            .or_else(|| self.gids.first())
            .map(|(i, _)| *i)
    }
}

#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    pub firmware: String,
    pub max_qp: i32,
    pub max_mr_size: u64,
    pub ports: Vec<PortInfo>,
}

/// GID table entries queried per port, at most (real tables are small; rxe has 1024).
const GIDS_PER_PORT_MAX: i32 = 1024;

/// Lists the RDMA devices of this machine, or says why there are none.
pub fn devices() -> Result<Vec<DeviceInfo>, VerbsUnavailable> {
    let lib = lib()?;
    let mut count: c_int = 0;
    // SAFETY: valid out-pointer; the list is freed below.
    let list = unsafe { (lib.get_device_list)(&mut count) };
    if list.is_null() || count <= 0 {
        if !list.is_null() {
            // SAFETY: a list returned by ibv_get_device_list.
            unsafe { (lib.free_device_list)(list) };
        }
        return Err(VerbsUnavailable::NoDevice);
    }
    let mut out = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        // SAFETY: the list holds `count` device pointers.
        let dev = unsafe { *list.add(i) };
        out.push(describe(lib, dev));
    }
    // SAFETY: as above; no device pointer is used after this.
    unsafe { (lib.free_device_list)(list) };
    out.into_iter().collect()
}

fn describe(lib: &Lib, dev: *mut c_void) -> Result<DeviceInfo, VerbsUnavailable> {
    // SAFETY: a device from the list; the name is a C string it owns.
    let name = unsafe { CStr::from_ptr((lib.get_device_name)(dev)) }
        .to_string_lossy()
        .into_owned();
    let fail = |call, error: String| VerbsUnavailable::Call {
        device: name.clone(),
        call,
        error,
    };
    // SAFETY: a device from the list.
    let ctx = unsafe { (lib.open_device)(dev) };
    if ctx.is_null() {
        return Err(fail(
            "ibv_open_device",
            std::io::Error::last_os_error().to_string(),
        ));
    }
    let result = (|| {
        // SAFETY: zeroed POD out-struct of the declared layout.
        let mut attr: IbvDeviceAttr = unsafe { std::mem::zeroed() };
        // SAFETY: an open context and a valid out-pointer.
        let rc = unsafe { (lib.query_device)(ctx, &mut attr) };
        if rc != 0 {
            return Err(fail(
                "ibv_query_device",
                std::io::Error::from_raw_os_error(rc).to_string(),
            ));
        }
        // SAFETY: fw_ver is NUL-terminated within its 64 bytes by rdma-core.
        let firmware = unsafe { CStr::from_ptr(attr.fw_ver.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        let mut ports = Vec::new();
        for port in 1..=attr.phys_port_cnt {
            // SAFETY: zeroed POD out-struct, padded past the compat layout.
            let mut pa: IbvPortAttr = unsafe { std::mem::zeroed() };
            // SAFETY: an open context, a port number the device reported, a valid out-pointer.
            let rc = unsafe { (lib.query_port)(ctx, port, &mut pa) };
            if rc != 0 {
                return Err(fail(
                    "ibv_query_port",
                    std::io::Error::from_raw_os_error(rc).to_string(),
                ));
            }
            let mut gids = Vec::new();
            for index in 0..pa.gid_tbl_len.min(GIDS_PER_PORT_MAX) {
                let mut gid = IbvGid([0; 16]);
                // SAFETY: an index below the table length and a valid out-pointer.
                if unsafe { (lib.query_gid)(ctx, port, index, &mut gid) } == 0 {
                    let gid = Gid(gid.0);
                    if !gid.is_zero() {
                        gids.push((index as u32, gid));
                    }
                }
            }
            ports.push(PortInfo {
                port,
                state: PortState::from_raw(pa.state),
                active_mtu: mtu_bytes(pa.active_mtu),
                link_layer: pa.link_layer,
                gids,
            });
        }
        Ok(DeviceInfo {
            name: name.clone(),
            firmware,
            max_qp: attr.max_qp,
            max_mr_size: attr.max_mr_size,
            ports,
        })
    })();
    // SAFETY: the context opened above, closed once.
    unsafe { (lib.close_device)(ctx) };
    result
}

/// Sizes and offsets of our declarations, named as C would name them, for the
/// ABI check in `hwtests` (which compiles the same expressions against the
/// installed `infiniband/verbs.h`).
#[doc(hidden)]
pub fn abi_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    let mut layout = vec![
        ("sizeof(struct ibv_device_attr)", size_of::<IbvDeviceAttr>()),
        (
            "offsetof(struct ibv_device_attr, max_mr_size)",
            offset_of!(IbvDeviceAttr, max_mr_size),
        ),
        (
            "offsetof(struct ibv_device_attr, max_qp)",
            offset_of!(IbvDeviceAttr, max_qp),
        ),
        (
            "offsetof(struct ibv_device_attr, max_srq_sge)",
            offset_of!(IbvDeviceAttr, max_srq_sge),
        ),
        (
            "offsetof(struct ibv_device_attr, phys_port_cnt)",
            offset_of!(IbvDeviceAttr, phys_port_cnt),
        ),
        // Our port struct is padded past the C one: compare the C size with where our padding starts.
        (
            "sizeof(struct ibv_port_attr)",
            offset_of!(IbvPortAttr, _reserved).next_multiple_of(std::mem::align_of::<c_int>()),
        ),
        (
            "offsetof(struct ibv_port_attr, active_mtu)",
            offset_of!(IbvPortAttr, active_mtu),
        ),
        (
            "offsetof(struct ibv_port_attr, gid_tbl_len)",
            offset_of!(IbvPortAttr, gid_tbl_len),
        ),
        (
            "offsetof(struct ibv_port_attr, lid)",
            offset_of!(IbvPortAttr, lid),
        ),
        (
            "offsetof(struct ibv_port_attr, link_layer)",
            offset_of!(IbvPortAttr, link_layer),
        ),
        (
            "offsetof(struct ibv_port_attr, port_cap_flags2)",
            offset_of!(IbvPortAttr, port_cap_flags2),
        ),
        ("sizeof(union ibv_gid)", size_of::<IbvGid>()),
    ];
    layout.extend(rc::abi_layout());
    layout
}

/// `enum ibv_mtu` to bytes.
fn mtu_bytes(mtu: c_int) -> u32 {
    match mtu {
        1..=5 => 128 << mtu,
        _ => 0,
    }
}

/// Whether a usable (active) verbs port exists, or why not: what
/// `--transport auto` decides on.
pub fn usable_port() -> Result<(String, PortInfo), VerbsUnavailable> {
    for dev in devices()? {
        if let Some(port) = dev.ports.into_iter().find(|p| p.state == PortState::Active) {
            return Ok((dev.name, port));
        }
    }
    Err(VerbsUnavailable::NoDevice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_verbs_h_of_rdma_core_44() {
        // hwtests' ABI check compares these with the installed headers.
        let layout: std::collections::HashMap<_, _> = abi_layout().into_iter().collect();
        assert_eq!(layout["sizeof(struct ibv_device_attr)"], 232);
        assert_eq!(
            layout["offsetof(struct ibv_device_attr, phys_port_cnt)"],
            227
        );
        assert_eq!(layout["offsetof(struct ibv_port_attr, link_layer)"], 46);
    }

    #[test]
    fn gids_and_mtus_decode() {
        let mut g = [0u8; 16];
        g[10] = 0xff;
        g[11] = 0xff;
        g[12..].copy_from_slice(&[192, 0, 2, 1]);
        assert_eq!(Gid(g).ipv4(), Some(std::net::Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(Gid(g).to_string(), "::ffff:192.0.2.1");
        assert_eq!(mtu_bytes(3), 1024);
        assert_eq!(mtu_bytes(5), 4096);
    }

    #[test]
    fn a_machine_without_rdma_says_why() {
        // On CI hosts and this machine: either no library or no device. With
        // a device (a developer's RDMA box) the list is simply non-empty.
        match devices() {
            Ok(list) => assert!(!list.is_empty()),
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }
}
