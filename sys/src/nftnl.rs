//! Owned libnftnl objects and the aligned buffer their netlink messages are written into.
//! Every raw pointer of switcheroo lives in this file and in `pidfd.rs`/`listen.rs`.

use nftnl::nftnl_sys as sys;
use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;

/// The room reserved for each message before it is written, because libnftnl and libmnl
/// write attributes without bounds checks. It is libmnl's `MNL_SOCKET_BUFFER_SIZE` at its
/// largest (the smaller of the page size and 8 KiB), which is also what libnftnl's own
/// batches reserve per message (their "overrun" size) and the largest request the kernel's
/// netlink layer is sure to take in one piece. Our largest message, a redirect rule with a
/// full 255-byte comment and the statistic match, is under 1 KiB.
pub(crate) const MSG_ROOM: usize = 8192;

/// A byte buffer aligned to 8, as `nlmsghdr` writers and readers require.
#[derive(Debug, Default)]
pub(crate) struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> Self {
        AlignedBuf {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `words` holds at least `len` initialised bytes (`len <= words.len() * 8` is
        // kept by every method), u64 has no padding, and u8 has alignment 1.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_bytes`; the exclusive borrow of `self` makes the slice unique.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    /// Appends one netlink message that `write` puts at the pointer it is given: the end of
    /// the buffer, 4-aligned, with [`MSG_ROOM`] zeroed bytes behind it. The message's length
    /// is then read back from the bytes of its header.
    ///
    /// # Safety
    /// `write` must write one netlink message, header first, of at most [`MSG_ROOM`] bytes,
    /// starting at the pointer it gets, and nothing outside those bytes.
    unsafe fn append(&mut self, write: impl FnOnce(*mut c_char)) {
        let start = self.len;
        let end = start + MSG_ROOM;
        if self.words.len() * 8 < end {
            self.words.resize(end.div_ceil(8), 0);
        }
        // Bytes past `len` may hold an earlier message: give the writer clean room.
        let room = {
            // SAFETY: `start..end` lies within `words` (resized above); the slice borrows
            // `self` exclusively and ends before `write` runs.
            let all = unsafe {
                std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), end)
            };
            &mut all[start..end]
        };
        room.fill(0);
        let at = room.as_mut_ptr();
        write(at.cast());
        self.len = end;
        let header = &self.as_bytes()[start..start + 4];
        let msg_len = u32::from_ne_bytes([header[0], header[1], header[2], header[3]]) as usize;
        // By the caller's promise this holds; checking it keeps a broken promise from
        // going on silently (the damage, if any, is done by then).
        assert!(
            (16..=MSG_ROOM).contains(&msg_len),
            "netlink message of {msg_len} bytes"
        );
        self.len = start + ((msg_len + 3) & !3);
    }

    /// Appends a whole message built in safe Rust (see [`crate::attr::MsgBuilder`]).
    pub fn put_bytes(&mut self, msg: &[u8]) {
        let start = self.len;
        let end = start + ((msg.len() + 3) & !3);
        if self.words.len() * 8 < end {
            self.words.resize(end.div_ceil(8), 0);
        }
        self.len = end;
        let bytes = self.as_bytes_mut();
        bytes[start..start + msg.len()].copy_from_slice(msg);
        bytes[start + msg.len()..end].fill(0);
    }

    /// Appends a message with the nfnetlink header (`nftnl_nlmsg_build_hdr`), then lets
    /// `payload` add the attributes of its object.
    pub fn put(
        &mut self,
        kind: u16,
        family: u8,
        flags: u16,
        seq: u32,
        payload: Option<&dyn Object>,
    ) {
        let write = |buf: *mut c_char| {
            // SAFETY: `buf` has MSG_ROOM writable bytes; build_hdr writes the 20-byte
            // nlmsghdr+nfgenmsg and returns a pointer to it.
            let nlh = unsafe { sys::nftnl_nlmsg_build_hdr(buf, kind, family.into(), flags, seq) };
            if let Some(obj) = payload {
                // SAFETY: `nlh` heads a message with MSG_ROOM bytes of room in all.
                unsafe { obj.build_payload(nlh) };
            }
        };
        // SAFETY: the header and the object's attributes are one message, and objects
        // stay within MSG_ROOM (the contract of `Object`).
        unsafe { self.append(write) };
    }

    /// Appends a batch delimiter (`NFNL_MSG_BATCH_BEGIN`/`END`), with the ruleset generation
    /// the batch was computed against on the begin message.
    pub fn put_batch_delimiter(&mut self, begin: bool, seq: u32, genid: Option<u32>) {
        let write = |buf: *mut c_char| {
            // SAFETY: `buf` has MSG_ROOM writable bytes; the batch helpers write a 20-byte
            // header.
            let nlh = unsafe {
                if begin {
                    sys::nftnl_batch_begin(buf, seq)
                } else {
                    sys::nftnl_batch_end(buf, seq)
                }
            };
            if let Some(genid) = genid {
                // SAFETY: `nlh` is the header just written with room behind it; the
                // attribute is 8 bytes. The kernel reads NFNL_BATCH_GENID as big endian.
                unsafe {
                    mnl::mnl_sys::mnl_attr_put_u32(
                        nlh.cast(),
                        libc::NFNL_BATCH_GENID as u16,
                        genid.to_be(),
                    )
                };
            }
        };
        // SAFETY: one 20- or 28-byte message.
        unsafe { self.append(write) };
    }
}

/// A libnftnl object that can write its attributes into a message.
///
/// # Safety
/// An implementation writes only the attributes of one object behind the header it is
/// given, at most [`MSG_ROOM`] bytes including that header.
pub(crate) unsafe trait Object {
    /// Writes the object's attributes behind `nlh` and updates its length.
    ///
    /// # Safety
    /// `nlh` must point to a valid, aligned netlink header that starts a region of
    /// [`MSG_ROOM`] writable bytes.
    unsafe fn build_payload(&self, nlh: *mut libc::nlmsghdr);
}

macro_rules! owned {
    ($name:ident, $raw:ty, $alloc:path, $free:path) => {
        #[derive(Debug)]
        pub(crate) struct $name(NonNull<$raw>);

        impl $name {
            pub fn new() -> Self {
                // SAFETY: the allocator takes no arguments and returns an owned object or
                // NULL on allocation failure.
                let raw = unsafe { $alloc() };
                // Like std, treat an allocation failure of a few bytes as fatal.
                $name(NonNull::new(raw).unwrap_or_else(|| std::process::abort()))
            }
        }

        impl Drop for $name {
            fn drop(&mut self) {
                // SAFETY: we own the object, and it is freed exactly once, here.
                unsafe { $free(self.0.as_ptr()) }
            }
        }
    };
}

owned!(
    TableObj,
    sys::nftnl_table,
    sys::nftnl_table_alloc,
    sys::nftnl_table_free
);
owned!(
    ChainObj,
    sys::nftnl_chain,
    sys::nftnl_chain_alloc,
    sys::nftnl_chain_free
);
owned!(
    RuleObj,
    sys::nftnl_rule,
    sys::nftnl_rule_alloc,
    sys::nftnl_rule_free
);

impl TableObj {
    pub fn set_str(&mut self, attr: u16, value: &CStr) {
        // SAFETY: valid object; libnftnl copies the NUL-terminated string.
        unsafe { sys::nftnl_table_set_str(self.0.as_ptr(), attr, value.as_ptr()) };
    }

    pub fn set_u32(&mut self, attr: u16, value: u32) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_table_set_u32(self.0.as_ptr(), attr, value) }
    }
}

// SAFETY: a table is a name and a few integers, far below MSG_ROOM.
unsafe impl Object for TableObj {
    unsafe fn build_payload(&self, nlh: *mut libc::nlmsghdr) {
        // SAFETY: the caller gives a header with MSG_ROOM bytes of room; the object is ours.
        unsafe { sys::nftnl_table_nlmsg_build_payload(nlh, self.0.as_ptr()) }
    }
}

impl ChainObj {
    pub fn set_str(&mut self, attr: u16, value: &CStr) {
        // SAFETY: valid object; libnftnl copies the NUL-terminated string.
        unsafe { sys::nftnl_chain_set_str(self.0.as_ptr(), attr, value.as_ptr()) };
    }

    pub fn set_u32(&mut self, attr: u16, value: u32) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_chain_set_u32(self.0.as_ptr(), attr, value) }
    }

    pub fn set_s32(&mut self, attr: u16, value: i32) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_chain_set_s32(self.0.as_ptr(), attr, value) }
    }
}

// SAFETY: a chain is two names, a type and a few integers, far below MSG_ROOM.
unsafe impl Object for ChainObj {
    unsafe fn build_payload(&self, nlh: *mut libc::nlmsghdr) {
        // SAFETY: the caller gives a header with MSG_ROOM bytes of room; the object is ours.
        unsafe { sys::nftnl_chain_nlmsg_build_payload(nlh, self.0.as_ptr()) }
    }
}

impl RuleObj {
    pub fn set_str(&mut self, attr: u16, value: &CStr) {
        // SAFETY: valid object; libnftnl copies the NUL-terminated string.
        unsafe { sys::nftnl_rule_set_str(self.0.as_ptr(), attr, value.as_ptr()) };
    }

    pub fn set_u32(&mut self, attr: u16, value: u32) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_rule_set_u32(self.0.as_ptr(), attr, value) }
    }

    pub fn set_u64(&mut self, attr: u16, value: u64) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_rule_set_u64(self.0.as_ptr(), attr, value) }
    }

    /// Appends an expression; the rule takes ownership of it.
    pub fn add_expr(&mut self, expr: Expr) {
        let raw = expr.0.as_ptr();
        std::mem::forget(expr);
        // SAFETY: both objects are valid; the rule now owns `raw` and frees it with itself.
        unsafe { sys::nftnl_rule_add_expr(self.0.as_ptr(), raw) }
    }
}

// SAFETY: the rules this crate builds are under 1 KiB (rule.rs: at most seven
// expressions, the largest payload the 256-byte comment).
unsafe impl Object for RuleObj {
    unsafe fn build_payload(&self, nlh: *mut libc::nlmsghdr) {
        // SAFETY: the caller gives a header with MSG_ROOM bytes of room; the object is ours.
        unsafe { sys::nftnl_rule_nlmsg_build_payload(nlh, self.0.as_ptr()) }
    }
}

/// An owned `nftnl_expr`.
#[derive(Debug)]
pub(crate) struct Expr(NonNull<sys::nftnl_expr>);

impl Expr {
    /// An expression of the given kind (`meta`, `cmp`, `payload`, `match`, `target`,
    /// `counter`).
    pub fn new(kind: &CStr) -> Self {
        // SAFETY: `kind` is NUL-terminated; an unknown kind returns NULL, which we treat
        // as the programming error it is.
        let raw = unsafe { sys::nftnl_expr_alloc(kind.as_ptr()) };
        Expr(NonNull::new(raw).expect("libnftnl knows every expression kind we build"))
    }

    pub fn set_u32(&mut self, attr: u32, value: u32) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_expr_set_u32(self.0.as_ptr(), attr as u16, value) }
    }

    pub fn set_u64(&mut self, attr: u32, value: u64) {
        // SAFETY: valid object; plain value.
        unsafe { sys::nftnl_expr_set_u64(self.0.as_ptr(), attr as u16, value) }
    }

    pub fn set_str(&mut self, attr: u32, value: &CStr) {
        // SAFETY: valid object; libnftnl copies the NUL-terminated string.
        unsafe { sys::nftnl_expr_set_str(self.0.as_ptr(), attr as u16, value.as_ptr()) };
    }

    /// Sets data that libnftnl copies into the expression (cmp data).
    pub fn set_bytes(&mut self, attr: u32, value: &[u8]) {
        // SAFETY: valid object; libnftnl copies `len` bytes from a valid slice.
        unsafe {
            sys::nftnl_expr_set(
                self.0.as_ptr(),
                attr as u16,
                value.as_ptr().cast::<c_void>(),
                value.len() as u32,
            )
        };
    }

    /// Sets an xtables payload (match/target info). libnftnl keeps the pointer it is given
    /// and `free`s it with the expression, so it gets a `malloc`ed copy of its own.
    pub fn set_xt_info(&mut self, attr: u32, value: &[u8]) {
        // SAFETY: malloc of a non-zero size; NULL is handled below.
        let copy = unsafe { libc::malloc(value.len().max(1)) }.cast::<u8>();
        if copy.is_null() {
            std::process::abort();
        }
        // SAFETY: `copy` has room for `value.len()` bytes and does not overlap `value`.
        unsafe { std::ptr::copy_nonoverlapping(value.as_ptr(), copy, value.len()) };
        // SAFETY: valid object; ownership of `copy` passes to libnftnl, which frees it (and
        // reads XT_ALIGN(len) bytes, which equals `len` for the aligned payloads of xt.rs).
        unsafe {
            sys::nftnl_expr_set(
                self.0.as_ptr(),
                attr as u16,
                copy.cast::<c_void>(),
                value.len() as u32,
            )
        };
    }
}

impl Drop for Expr {
    fn drop(&mut self) {
        // SAFETY: we own the expression (ownership moves out in `RuleObj::add_expr`, which
        // forgets the wrapper), so it is freed exactly once.
        unsafe { sys::nftnl_expr_free(self.0.as_ptr()) }
    }
}
