//! Reliable-connected queue pairs through the dlopen'ed libibverbs: the parts
//! of verbs the fabric's RDMA backend is built from. Protection domain, one
//! memory registration, completion queues, RC queue pairs brought to RTS
//! against a peer's QPN/GID, and the three data-path calls (`post_send`,
//! `post_recv`, `poll_cq`) that verbs.h inlines through the context's ops
//! table.
//!
//! Also the shared receive queue and completion channels (arm a CQ, sleep
//! on the channel's descriptor, take the event). Not yet here: the
//! active-message protocol over all this (issue 4).

use std::ffi::{c_int, c_void};
use std::ptr::{self, NonNull};

use super::{lib, Gid, VerbsUnavailable};

// --- declarations of verbs.h ------------------------------------------------

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IbvSge {
    pub addr: u64,
    pub length: u32,
    pub lkey: u32,
}

#[repr(C)]
pub(super) struct IbvRecvWr {
    pub wr_id: u64,
    pub next: *mut IbvRecvWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
}

/// `struct ibv_send_wr`, with the unions we do not use kept as padding.
#[repr(C)]
pub(super) struct IbvSendWr {
    pub wr_id: u64,
    pub next: *mut IbvSendWr,
    pub sg_list: *mut IbvSge,
    pub num_sge: c_int,
    pub opcode: u32,
    pub send_flags: u32,
    pub imm_data: u32,
    /// `wr.rdma.remote_addr`
    pub remote_addr: u64,
    /// `wr.rdma.rkey`
    pub rkey: u32,
    pub _wr_rest: [u8; 20],
    pub _qp_type: u32,
    pub _pad: u32,
    pub _bind_mw_or_tso: [u64; 6],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct IbvWc {
    pub wr_id: u64,
    pub status: u32,
    pub opcode: u32,
    pub vendor_err: u32,
    pub byte_len: u32,
    pub imm_data: u32,
    pub qp_num: u32,
    pub src_qp: u32,
    pub wc_flags: u32,
    pub pkey_index: u16,
    pub slid: u16,
    pub sl: u8,
    pub dlid_path_bits: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct IbvQpCap {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    pub max_inline_data: u32,
}

#[repr(C)]
pub(super) struct IbvQpInitAttr {
    pub qp_context: *mut c_void,
    pub send_cq: *mut c_void,
    pub recv_cq: *mut c_void,
    pub srq: *mut c_void,
    pub cap: IbvQpCap,
    pub qp_type: u32,
    pub sq_sig_all: c_int,
}

/// `struct ibv_global_route`; 8-aligned like C's, whose `union ibv_gid` holds u64s.
#[repr(C, align(8))]
#[derive(Clone, Copy, Default)]
pub(super) struct IbvGlobalRoute {
    pub dgid: [u8; 16],
    pub flow_label: u32,
    pub sgid_index: u8,
    pub hop_limit: u8,
    pub traffic_class: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct IbvAhAttr {
    pub grh: IbvGlobalRoute,
    pub dlid: u16,
    pub sl: u8,
    pub src_path_bits: u8,
    pub static_rate: u8,
    pub is_global: u8,
    pub port_num: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct IbvQpAttr {
    pub qp_state: u32,
    pub cur_qp_state: u32,
    pub path_mtu: u32,
    pub path_mig_state: u32,
    pub qkey: u32,
    pub rq_psn: u32,
    pub sq_psn: u32,
    pub dest_qp_num: u32,
    pub qp_access_flags: u32,
    pub cap: IbvQpCap,
    pub ah_attr: IbvAhAttr,
    pub alt_ah_attr: IbvAhAttr,
    pub pkey_index: u16,
    pub alt_pkey_index: u16,
    pub en_sqd_async_notify: u8,
    pub sq_draining: u8,
    pub max_rd_atomic: u8,
    pub max_dest_rd_atomic: u8,
    pub min_rnr_timer: u8,
    pub port_num: u8,
    pub timeout: u8,
    pub retry_cnt: u8,
    pub rnr_retry: u8,
    pub alt_port_num: u8,
    pub alt_timeout: u8,
    pub rate_limit: u32,
}

/// The leading fields of `struct ibv_mr`.
#[repr(C)]
pub(super) struct IbvMr {
    pub context: *mut c_void,
    pub pd: *mut c_void,
    pub addr: *mut c_void,
    pub length: usize,
    pub handle: u32,
    pub lkey: u32,
    pub rkey: u32,
}

/// The leading fields of `struct ibv_qp`.
#[repr(C)]
pub(super) struct IbvQpHead {
    pub context: *mut IbvContextHead,
    pub qp_context: *mut c_void,
    pub pd: *mut c_void,
    pub send_cq: *mut c_void,
    pub recv_cq: *mut c_void,
    pub srq: *mut c_void,
    pub handle: u32,
    pub qp_num: u32,
}

/// The leading fields of `struct ibv_cq`.
#[repr(C)]
pub(super) struct IbvCqHead {
    pub context: *mut IbvContextHead,
}

type PollCq = unsafe extern "C" fn(*mut c_void, c_int, *mut IbvWc) -> c_int;
type PostSend = unsafe extern "C" fn(*mut c_void, *mut IbvSendWr, *mut *mut IbvSendWr) -> c_int;
type PostRecv = unsafe extern "C" fn(*mut c_void, *mut IbvRecvWr, *mut *mut IbvRecvWr) -> c_int;
type ReqNotifyCq = unsafe extern "C" fn(*mut c_void, c_int) -> c_int;

/// `struct ibv_context_ops`: 32 function pointers; we call three of them.
#[repr(C)]
pub(super) struct IbvContextOps {
    pub _before_poll_cq: [*mut c_void; 11],
    pub poll_cq: Option<PollCq>,
    pub req_notify_cq: Option<ReqNotifyCq>,
    pub _before_post_srq_recv: [*mut c_void; 7],
    pub post_srq_recv: Option<PostRecv>,
    pub _before_post_send: [*mut c_void; 4],
    pub post_send: Option<PostSend>,
    pub post_recv: Option<PostRecv>,
    pub _after: [*mut c_void; 5],
}

/// `struct ibv_srq_init_attr`.
#[repr(C)]
pub(super) struct IbvSrqInitAttr {
    pub srq_context: *mut c_void,
    pub max_wr: u32,
    pub max_sge: u32,
    pub srq_limit: u32,
}

/// The leading fields of `struct ibv_srq`.
#[repr(C)]
pub(super) struct IbvSrqHead {
    pub context: *mut IbvContextHead,
}

/// The leading fields of `struct ibv_comp_channel`.
#[repr(C)]
pub(super) struct IbvCompChannel {
    pub context: *mut c_void,
    pub fd: c_int,
    pub refcnt: c_int,
}

/// The leading fields of `struct ibv_context`.
#[repr(C)]
pub(super) struct IbvContextHead {
    pub device: *mut c_void,
    pub ops: IbvContextOps,
}

pub(super) const QPT_RC: u32 = 2;
const QPS_INIT: u32 = 1;
const QPS_RTR: u32 = 2;
const QPS_RTS: u32 = 3;
const QPS_ERR: u32 = 6;
const QP_STATE: c_int = 1 << 0;
const QP_ACCESS_FLAGS: c_int = 1 << 3;
const QP_PKEY_INDEX: c_int = 1 << 4;
const QP_PORT: c_int = 1 << 5;
const QP_AV: c_int = 1 << 7;
const QP_PATH_MTU: c_int = 1 << 8;
const QP_TIMEOUT: c_int = 1 << 9;
const QP_RETRY_CNT: c_int = 1 << 10;
const QP_RNR_RETRY: c_int = 1 << 11;
const QP_RQ_PSN: c_int = 1 << 12;
const QP_MAX_QP_RD_ATOMIC: c_int = 1 << 13;
const QP_MIN_RNR_TIMER: c_int = 1 << 15;
const QP_SQ_PSN: c_int = 1 << 16;
const QP_MAX_DEST_RD_ATOMIC: c_int = 1 << 17;
const QP_DEST_QPN: c_int = 1 << 20;
pub(super) const ACCESS_LOCAL_WRITE: c_int = 1;
pub(super) const ACCESS_REMOTE_WRITE: c_int = 2;
pub(super) const ACCESS_REMOTE_READ: c_int = 4;
/// `IBV_WR_SEND`
pub const WR_SEND: u32 = 2;
/// `IBV_WR_RDMA_READ`
pub const WR_RDMA_READ: u32 = 4;
/// `IBV_WR_RDMA_WRITE`
pub const WR_RDMA_WRITE: u32 = 0;
const SEND_SIGNALED: u32 = 2;
/// `IBV_SEND_INLINE`: the provider copies the payload into the work request.
const SEND_INLINE: u32 = 8;
/// Bytes of inline data asked for at QP creation (the provider may give less).
const INLINE_BYTES_WANTED: u32 = 256;

/// `enum ibv_mtu` for a path MTU in bytes (256 to 4096; others round down).
fn mtu_enum(bytes: u32) -> u32 {
    match bytes {
        4096.. => 5,
        2048..=4095 => 4,
        1024..=2047 => 3,
        512..=1023 => 2,
        _ => 1,
    }
}

// --- a small safe layer ------------------------------------------------------

fn call_error(device: &str, call: &'static str, rc: c_int) -> VerbsUnavailable {
    let errno = if rc > 0 {
        rc
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    };
    VerbsUnavailable::Call {
        device: device.into(),
        call,
        error: std::io::Error::from_raw_os_error(errno).to_string(),
    }
}

/// An open device with a protection domain and one registered memory span
/// (for the fabric: the whole arena).
pub struct RcDevice {
    name: String,
    ctx: NonNull<IbvContextHead>,
    pd: NonNull<c_void>,
    mr: NonNull<IbvMr>,
    port: u8,
    gid_index: u8,
    gid: Gid,
}

// SAFETY: verbs objects may be used from any thread; we never share `&mut`.
unsafe impl Send for RcDevice {}

impl RcDevice {
    /// Opens `name`, allocates a PD and registers `[addr, addr + len)` for
    /// local write and remote read/write.
    ///
    /// # Safety
    /// The span must stay mapped for the life of the device.
    pub unsafe fn open(
        name: &str,
        port: u8,
        gid_index: u8,
        addr: *mut u8,
        len: usize,
    ) -> Result<RcDevice, VerbsUnavailable> {
        let lib = lib()?;
        let mut count = 0;
        // SAFETY: valid out-pointer; freed below.
        let list = unsafe { (lib.get_device_list)(&mut count) };
        if list.is_null() {
            return Err(VerbsUnavailable::NoDevice);
        }
        let mut found = ptr::null_mut();
        for i in 0..count.max(0) as usize {
            // SAFETY: `count` entries.
            let dev = unsafe { *list.add(i) };
            // SAFETY: a listed device's name.
            let dev_name = unsafe { std::ffi::CStr::from_ptr((lib.get_device_name)(dev)) };
            if dev_name.to_bytes() == name.as_bytes() {
                // SAFETY: a listed device.
                found = unsafe { (lib.open_device)(dev) };
                break;
            }
        }
        // SAFETY: the list from ibv_get_device_list; contexts outlive it.
        unsafe { (lib.free_device_list)(list) };
        let ctx = NonNull::new(found.cast::<IbvContextHead>()).ok_or(VerbsUnavailable::NoDevice)?;
        let mut gid = super::IbvGid([0; 16]);
        // SAFETY: an open context and a valid out-pointer.
        let rc =
            unsafe { (lib.query_gid)(ctx.as_ptr().cast(), port, c_int::from(gid_index), &mut gid) };
        if rc != 0 {
            // SAFETY: opened above.
            unsafe { (lib.close_device)(ctx.as_ptr().cast()) };
            return Err(call_error(name, "ibv_query_gid", rc));
        }
        // SAFETY: an open context.
        let pd = NonNull::new(unsafe { (lib.alloc_pd)(ctx.as_ptr().cast()) });
        let Some(pd) = pd else {
            // SAFETY: opened above.
            unsafe { (lib.close_device)(ctx.as_ptr().cast()) };
            return Err(call_error(name, "ibv_alloc_pd", 0));
        };
        let access = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ;
        // SAFETY: the caller keeps the span mapped.
        let mr = NonNull::new(
            unsafe { (lib.reg_mr)(pd.as_ptr(), addr.cast(), len, access) }.cast::<IbvMr>(),
        );
        let Some(mr) = mr else {
            // SAFETY: allocated and opened above.
            unsafe {
                (lib.dealloc_pd)(pd.as_ptr());
                (lib.close_device)(ctx.as_ptr().cast());
            }
            return Err(call_error(name, "ibv_reg_mr", 0));
        };
        Ok(RcDevice {
            name: name.into(),
            ctx,
            pd,
            mr,
            port,
            gid_index,
            gid: Gid(gid.0),
        })
    }

    /// The registration's keys: (lkey, rkey).
    pub fn keys(&self) -> (u32, u32) {
        // SAFETY: a live registration.
        let mr = unsafe { self.mr.as_ref() };
        (mr.lkey, mr.rkey)
    }

    pub fn gid(&self) -> Gid {
        self.gid
    }

    /// A completion channel: a file descriptor a worker sleeps on when idle.
    pub fn create_channel(&self) -> Result<CompChannel, VerbsUnavailable> {
        let lib = lib()?;
        // SAFETY: an open context.
        let ch = unsafe { (lib.create_comp_channel)(self.ctx.as_ptr().cast()) };
        let ch = NonNull::new(ch.cast::<IbvCompChannel>())
            .ok_or_else(|| call_error(&self.name, "ibv_create_comp_channel", 0))?;
        Ok(CompChannel { ch })
    }

    /// A shared receive queue of `depth` one-buffer receives.
    pub fn create_srq(&self, depth: u32) -> Result<Srq, VerbsUnavailable> {
        let lib = lib()?;
        let mut attr = IbvSrqInitAttr {
            srq_context: ptr::null_mut(),
            max_wr: depth,
            max_sge: 1,
            srq_limit: 0,
        };
        // SAFETY: a live PD and a valid attribute struct.
        let srq = unsafe { (lib.create_srq)(self.pd.as_ptr(), &mut attr) };
        let srq = NonNull::new(srq.cast::<IbvSrqHead>())
            .ok_or_else(|| call_error(&self.name, "ibv_create_srq", 0))?;
        Ok(Srq {
            srq,
            device: self.name.clone(),
        })
    }

    /// A completion queue of `entries`, reporting to `channel` when armed.
    pub fn create_cq(
        &self,
        entries: i32,
        channel: Option<&CompChannel>,
    ) -> Result<Cq, VerbsUnavailable> {
        let lib = lib()?;
        let ch = channel.map_or(ptr::null_mut(), |c| c.ch.as_ptr().cast());
        // SAFETY: an open context, a live channel or none, vector 0.
        let cq =
            unsafe { (lib.create_cq)(self.ctx.as_ptr().cast(), entries, ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(cq.cast::<IbvCqHead>())
            .ok_or_else(|| call_error(&self.name, "ibv_create_cq", 0))?;
        Ok(Cq { cq })
    }

    /// An RC queue pair on `cq` (sends and receives), taking receives from
    /// `srq` when given, in state RESET.
    pub fn create_qp(
        &self,
        cq: &Cq,
        srq: Option<&Srq>,
        depth: u32,
    ) -> Result<RcQp, VerbsUnavailable> {
        let lib = lib()?;
        let mut attr = IbvQpInitAttr {
            qp_context: ptr::null_mut(),
            send_cq: cq.cq.as_ptr().cast(),
            recv_cq: cq.cq.as_ptr().cast(),
            srq: srq.map_or(ptr::null_mut(), |s| s.srq.as_ptr().cast()),
            cap: IbvQpCap {
                max_send_wr: depth,
                max_recv_wr: depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: INLINE_BYTES_WANTED,
            },
            qp_type: QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: a live PD and a valid attribute struct.
        let mut qp = unsafe { (lib.create_qp)(self.pd.as_ptr(), &mut attr) };
        if qp.is_null() {
            // A device without inline sends: ask again for none.
            attr.cap.max_inline_data = 0;
            // SAFETY: as above.
            qp = unsafe { (lib.create_qp)(self.pd.as_ptr(), &mut attr) };
        }
        let qp = NonNull::new(qp.cast::<IbvQpHead>())
            .ok_or_else(|| call_error(&self.name, "ibv_create_qp", 0))?;
        Ok(RcQp {
            qp,
            device: self.name.clone(),
            port: self.port,
            gid_index: self.gid_index,
            // The provider wrote back what it granted.
            max_inline: attr.cap.max_inline_data,
        })
    }
}

impl Drop for RcDevice {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: objects created by `open`, released once, in reverse order.
            unsafe {
                (lib.dereg_mr)(self.mr.as_ptr().cast());
                (lib.dealloc_pd)(self.pd.as_ptr());
                (lib.close_device)(self.ctx.as_ptr().cast());
            }
        }
    }
}

/// A completion queue.
pub struct Cq {
    cq: NonNull<IbvCqHead>,
}

// SAFETY: as for RcDevice.
unsafe impl Send for Cq {}

/// A completed work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub wr_id: u64,
    /// `ibv_wc_status`: 0 is success.
    pub status: u32,
    pub byte_len: u32,
    pub qp_num: u32,
}

impl Cq {
    /// Takes up to `out.len()` completions without blocking.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsUnavailable> {
        const POLL_BATCH: usize = 16;
        let mut wc = [IbvWc {
            wr_id: 0,
            status: 0,
            opcode: 0,
            vendor_err: 0,
            byte_len: 0,
            imm_data: 0,
            qp_num: 0,
            src_qp: 0,
            wc_flags: 0,
            pkey_index: 0,
            slid: 0,
            sl: 0,
            dlid_path_bits: 0,
        }; POLL_BATCH];
        // SAFETY: a live CQ; its context's ops table is the provider's.
        let poll = unsafe { (*self.cq.as_ref().context).ops.poll_cq }
            .ok_or(VerbsUnavailable::MissingSymbol("ops.poll_cq"))?;
        // SAFETY: a live CQ and room for `n` entries.
        let n = unsafe {
            poll(
                self.cq.as_ptr().cast(),
                max.min(POLL_BATCH) as c_int,
                wc.as_mut_ptr(),
            )
        };
        if n < 0 {
            return Err(VerbsUnavailable::Call {
                device: String::new(),
                call: "ibv_poll_cq",
                error: format!("returned {n}"),
            });
        }
        for w in &wc[..n as usize] {
            out.push(Completion {
                wr_id: w.wr_id,
                status: w.status,
                byte_len: w.byte_len,
                qp_num: w.qp_num,
            });
        }
        Ok(n as usize)
    }
}

impl Cq {
    /// Asks for an event on the CQ's channel at the next completion. Arm, then
    /// poll once more, then sleep: a completion between the last poll and the
    /// arming would otherwise be missed.
    pub fn arm(&self) -> Result<(), VerbsUnavailable> {
        // SAFETY: the provider's ops table of a live CQ's context.
        let notify = unsafe { (*self.cq.as_ref().context).ops.req_notify_cq }
            .ok_or(VerbsUnavailable::MissingSymbol("ops.req_notify_cq"))?;
        // SAFETY: a live CQ; 0 = any completion, not only solicited.
        let rc = unsafe { notify(self.cq.as_ptr().cast(), 0) };
        if rc != 0 {
            return Err(call_error("cq", "ibv_req_notify_cq", rc));
        }
        Ok(())
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: created by create_cq; its QPs are dropped first by the owner.
            unsafe { (lib.destroy_cq)(self.cq.as_ptr().cast()) };
        }
    }
}

/// A completion channel.
pub struct CompChannel {
    ch: NonNull<IbvCompChannel>,
}

// SAFETY: as for RcDevice.
unsafe impl Send for CompChannel {}

impl CompChannel {
    /// The descriptor to sleep on (poll/epoll for readable).
    pub fn fd(&self) -> c_int {
        // SAFETY: a live channel.
        unsafe { self.ch.as_ref().fd }
    }

    /// Takes the event of an armed CQ that fired, acknowledging it. Call when
    /// `fd` is readable; the caller then polls the CQ and re-arms it.
    pub fn take_event(&self, cq: &Cq) -> Result<(), VerbsUnavailable> {
        let lib = lib()?;
        let mut fired: *mut c_void = ptr::null_mut();
        let mut context: *mut c_void = ptr::null_mut();
        // SAFETY: a live channel with a pending event (the fd was readable).
        let rc = unsafe { (lib.get_cq_event)(self.ch.as_ptr().cast(), &mut fired, &mut context) };
        if rc != 0 {
            return Err(call_error("channel", "ibv_get_cq_event", rc));
        }
        // SAFETY: one event taken above, acknowledged once.
        unsafe { (lib.ack_cq_events)(fired, 1) };
        if fired != cq.cq.as_ptr().cast::<c_void>() {
            return Err(VerbsUnavailable::Call {
                device: String::new(),
                call: "ibv_get_cq_event",
                error: "an event for another CQ".into(),
            });
        }
        Ok(())
    }
}

impl Drop for CompChannel {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: its CQs are destroyed first by the owner.
            unsafe { (lib.destroy_comp_channel)(self.ch.as_ptr().cast()) };
        }
    }
}

/// A shared receive queue: one pool of posted receives for many QPs.
pub struct Srq {
    srq: NonNull<IbvSrqHead>,
    device: String,
}

// SAFETY: as for RcDevice.
unsafe impl Send for Srq {}

impl Srq {
    /// Posts a receive of up to `len` bytes at `addr` (registered with `lkey`).
    pub fn post_recv(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), VerbsUnavailable> {
        // SAFETY: the provider's ops table of a live SRQ's context.
        let post = unsafe { (*self.srq.as_ref().context).ops.post_srq_recv };
        post_one_recv(
            post,
            self.srq.as_ptr().cast(),
            (wr_id, addr, len, lkey),
            &self.device,
            "ibv_post_srq_recv",
        )
    }
}

impl Drop for Srq {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: its QPs are destroyed first by the owner.
            unsafe { (lib.destroy_srq)(self.srq.as_ptr().cast()) };
        }
    }
}

/// Posts one single-buffer receive `(wr_id, addr, len, lkey)` through a
/// provider's post function (a QP's or an SRQ's: the same calling shape).
fn post_one_recv(
    post: Option<PostRecv>,
    target: *mut c_void,
    (wr_id, addr, len, lkey): (u64, u64, u32, u32),
    device: &str,
    call: &'static str,
) -> Result<(), VerbsUnavailable> {
    let post = post.ok_or(VerbsUnavailable::MissingSymbol(call))?;
    let mut sge = IbvSge {
        addr,
        length: len,
        lkey,
    };
    let mut wr = IbvRecvWr {
        wr_id,
        next: ptr::null_mut(),
        sg_list: &mut sge,
        num_sge: 1,
    };
    let mut bad = ptr::null_mut();
    // SAFETY: a live QP or SRQ for `post`; the provider copies the request.
    let rc = unsafe { post(target, &mut wr, &mut bad) };
    if rc != 0 {
        return Err(call_error(device, call, rc));
    }
    Ok(())
}

/// What a peer needs to connect to a queue pair (sent out of band).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpInfo {
    pub qpn: u32,
    pub psn: u32,
    pub gid: Gid,
    /// Path MTU in bytes: the smaller of both ports' active MTUs.
    pub mtu: u32,
}

/// A reliable-connected queue pair.
pub struct RcQp {
    qp: NonNull<IbvQpHead>,
    device: String,
    port: u8,
    gid_index: u8,
    /// SENDs up to this many bytes go inline.
    max_inline: u32,
}

// SAFETY: as for RcDevice.
unsafe impl Send for RcQp {}

impl RcQp {
    pub fn qpn(&self) -> u32 {
        // SAFETY: a live QP.
        unsafe { self.qp.as_ref().qp_num }
    }

    fn modify(
        &self,
        attr: &mut IbvQpAttr,
        mask: c_int,
        what: &'static str,
    ) -> Result<(), VerbsUnavailable> {
        let lib = lib()?;
        // SAFETY: a live QP and a valid attribute struct.
        let rc = unsafe { (lib.modify_qp)(self.qp.as_ptr().cast(), attr, mask) };
        if rc != 0 {
            return Err(call_error(&self.device, what, rc));
        }
        Ok(())
    }

    /// RESET → INIT → RTR → RTS against `remote`, sending from `local_psn`.
    pub fn connect(&self, local_psn: u32, remote: QpInfo) -> Result<(), VerbsUnavailable> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_INIT,
            pkey_index: 0,
            port_num: self.port,
            qp_access_flags: (ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE | ACCESS_REMOTE_READ) as u32,
            ..IbvQpAttr::default()
        };
        self.modify(
            &mut attr,
            QP_STATE | QP_PKEY_INDEX | QP_PORT | QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )?;
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTR,
            path_mtu: mtu_enum(remote.mtu),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: 16,
            min_rnr_timer: 12,
            ah_attr: IbvAhAttr {
                grh: IbvGlobalRoute {
                    dgid: remote.gid.0,
                    sgid_index: self.gid_index,
                    hop_limit: 64,
                    ..IbvGlobalRoute::default()
                },
                is_global: 1,
                port_num: self.port,
                ..IbvAhAttr::default()
            },
            ..IbvQpAttr::default()
        };
        let rtr = QP_STATE
            | QP_AV
            | QP_PATH_MTU
            | QP_DEST_QPN
            | QP_RQ_PSN
            | QP_MAX_DEST_RD_ATOMIC
            | QP_MIN_RNR_TIMER;
        self.modify(&mut attr, rtr, "ibv_modify_qp(RTR)")?;
        let mut attr = IbvQpAttr {
            qp_state: QPS_RTS,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            sq_psn: local_psn,
            max_rd_atomic: 16,
            ..IbvQpAttr::default()
        };
        let rts =
            QP_STATE | QP_TIMEOUT | QP_RETRY_CNT | QP_RNR_RETRY | QP_SQ_PSN | QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut attr, rts, "ibv_modify_qp(RTS)")
    }

    /// Moves the QP to ERROR: its outstanding work requests complete, flushed.
    pub fn move_to_error(&self) -> Result<(), VerbsUnavailable> {
        let mut attr = IbvQpAttr {
            qp_state: QPS_ERR,
            ..IbvQpAttr::default()
        };
        self.modify(&mut attr, QP_STATE, "ibv_modify_qp(ERR)")
    }

    fn context(&self) -> *mut IbvContextHead {
        // SAFETY: a live QP.
        unsafe { self.qp.as_ref().context }
    }

    /// Posts a receive of up to `len` bytes at `addr` (registered with `lkey`).
    pub fn post_recv(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
    ) -> Result<(), VerbsUnavailable> {
        // SAFETY: the provider's ops table of a live context.
        let post = unsafe { (*self.context()).ops.post_recv };
        post_one_recv(
            post,
            self.qp.as_ptr().cast(),
            (wr_id, addr, len, lkey),
            &self.device,
            "ibv_post_recv",
        )
    }

    /// Posts a signaled `opcode` (WR_SEND, WR_RDMA_READ, WR_RDMA_WRITE) of
    /// `len` bytes at local `addr`; `remote` is (address, rkey) for RDMA.
    pub fn post_send(
        &self,
        wr_id: u64,
        opcode: u32,
        addr: u64,
        len: u32,
        lkey: u32,
        remote: Option<(u64, u32)>,
    ) -> Result<(), VerbsUnavailable> {
        self.post_send_signaled(wr_id, opcode, (addr, len, lkey), remote, true)
    }

    /// As [`RcQp::post_send`], with the completion optional: an unsignaled
    /// request completes silently (its buffer is free once a later signaled
    /// request of this QP completes; errors are reported either way).
    pub fn post_send_signaled(
        &self,
        wr_id: u64,
        opcode: u32,
        (addr, len, lkey): (u64, u32, u32),
        remote: Option<(u64, u32)>,
        signaled: bool,
    ) -> Result<(), VerbsUnavailable> {
        let mut sge = IbvSge {
            addr,
            length: len,
            lkey,
        };
        let (remote_addr, rkey) = remote.unwrap_or((0, 0));
        let mut wr = IbvSendWr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &mut sge,
            num_sge: 1,
            opcode,
            send_flags: (if signaled { SEND_SIGNALED } else { 0 })
                | (if opcode == WR_SEND && len <= self.max_inline {
                    SEND_INLINE
                } else {
                    0
                }),
            imm_data: 0,
            remote_addr,
            rkey,
            _wr_rest: [0; 20],
            _qp_type: 0,
            _pad: 0,
            _bind_mw_or_tso: [0; 6],
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the provider's ops table of a live context.
        let post = unsafe { (*self.context()).ops.post_send }
            .ok_or(VerbsUnavailable::MissingSymbol("ops.post_send"))?;
        // SAFETY: a live QP; the work request is copied by the provider.
        let rc = unsafe { post(self.qp.as_ptr().cast(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(call_error(&self.device, "ibv_post_send", rc));
        }
        Ok(())
    }
}

impl Drop for RcQp {
    fn drop(&mut self) {
        if let Ok(lib) = lib() {
            // SAFETY: created by create_qp, destroyed once.
            unsafe { (lib.destroy_qp)(self.qp.as_ptr().cast()) };
        }
    }
}

/// Sizes and offsets of these declarations, named as C names them, for the
/// ABI check in `hwtests`.
pub(super) fn abi_layout() -> Vec<(&'static str, usize)> {
    use std::mem::{offset_of, size_of};
    vec![
        ("sizeof(struct ibv_sge)", size_of::<IbvSge>()),
        ("sizeof(struct ibv_recv_wr)", size_of::<IbvRecvWr>()),
        ("sizeof(struct ibv_send_wr)", size_of::<IbvSendWr>()),
        (
            "offsetof(struct ibv_send_wr, opcode)",
            offset_of!(IbvSendWr, opcode),
        ),
        (
            "offsetof(struct ibv_send_wr, send_flags)",
            offset_of!(IbvSendWr, send_flags),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.remote_addr)",
            offset_of!(IbvSendWr, remote_addr),
        ),
        (
            "offsetof(struct ibv_send_wr, wr.rdma.rkey)",
            offset_of!(IbvSendWr, rkey),
        ),
        ("sizeof(struct ibv_wc)", size_of::<IbvWc>()),
        (
            "offsetof(struct ibv_wc, byte_len)",
            offset_of!(IbvWc, byte_len),
        ),
        ("offsetof(struct ibv_wc, qp_num)", offset_of!(IbvWc, qp_num)),
        (
            "sizeof(struct ibv_qp_init_attr)",
            size_of::<IbvQpInitAttr>(),
        ),
        (
            "offsetof(struct ibv_qp_init_attr, qp_type)",
            offset_of!(IbvQpInitAttr, qp_type),
        ),
        ("sizeof(struct ibv_qp_attr)", size_of::<IbvQpAttr>()),
        (
            "offsetof(struct ibv_qp_attr, ah_attr)",
            offset_of!(IbvQpAttr, ah_attr),
        ),
        (
            "offsetof(struct ibv_qp_attr, pkey_index)",
            offset_of!(IbvQpAttr, pkey_index),
        ),
        (
            "offsetof(struct ibv_qp_attr, port_num)",
            offset_of!(IbvQpAttr, port_num),
        ),
        (
            "offsetof(struct ibv_qp_attr, rnr_retry)",
            offset_of!(IbvQpAttr, rnr_retry),
        ),
        ("sizeof(struct ibv_ah_attr)", size_of::<IbvAhAttr>()),
        (
            "offsetof(struct ibv_ah_attr, is_global)",
            offset_of!(IbvAhAttr, is_global),
        ),
        ("offsetof(struct ibv_mr, lkey)", offset_of!(IbvMr, lkey)),
        ("offsetof(struct ibv_mr, rkey)", offset_of!(IbvMr, rkey)),
        (
            "offsetof(struct ibv_qp, qp_num)",
            offset_of!(IbvQpHead, qp_num),
        ),
        (
            "offsetof(struct ibv_context, ops)",
            offset_of!(IbvContextHead, ops),
        ),
        (
            "offsetof(struct ibv_context_ops, poll_cq)",
            offset_of!(IbvContextOps, poll_cq),
        ),
        (
            "offsetof(struct ibv_context_ops, post_send)",
            offset_of!(IbvContextOps, post_send),
        ),
        (
            "offsetof(struct ibv_context_ops, post_recv)",
            offset_of!(IbvContextOps, post_recv),
        ),
        ("sizeof(struct ibv_context_ops)", size_of::<IbvContextOps>()),
        (
            "offsetof(struct ibv_context_ops, req_notify_cq)",
            offset_of!(IbvContextOps, req_notify_cq),
        ),
        (
            "offsetof(struct ibv_context_ops, post_srq_recv)",
            offset_of!(IbvContextOps, post_srq_recv),
        ),
        (
            "sizeof(struct ibv_srq_init_attr)",
            size_of::<IbvSrqInitAttr>(),
        ),
        (
            "offsetof(struct ibv_srq_init_attr, attr.srq_limit)",
            offset_of!(IbvSrqInitAttr, srq_limit),
        ),
        (
            "offsetof(struct ibv_comp_channel, fd)",
            offset_of!(IbvCompChannel, fd),
        ),
        ("IBV_QPT_RC", QPT_RC as usize),
        ("IBV_WR_SEND", WR_SEND as usize),
        ("IBV_WR_RDMA_READ", WR_RDMA_READ as usize),
        ("IBV_SEND_SIGNALED", SEND_SIGNALED as usize),
        ("IBV_QP_DEST_QPN", QP_DEST_QPN as usize),
        ("IBV_QP_MAX_DEST_RD_ATOMIC", QP_MAX_DEST_RD_ATOMIC as usize),
        ("IBV_MTU_1024", mtu_enum(1024) as usize),
        ("IBV_QPS_RTS", QPS_RTS as usize),
    ]
}
