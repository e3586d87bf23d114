//! Loop devices through the kernel's ioctls (`linux/loop.h`).
//!
//! [`attach`] asks `/dev/loop-control` for a free device
//! (`LOOP_CTL_GET_FREE`) and configures it in one step (`LOOP_CONFIGURE`,
//! Linux 5.8+): backing file, read-only, direct I/O if asked, and
//! autoclear. Autoclear makes the kernel detach the device when its last
//! opener closes it: the [`LoopDevice`] descriptor until the filesystem is
//! mounted, then the mount. So a process killed at any point leaks no
//! device, and unmounting the filesystem frees it.
//!
//! The structs and ioctl numbers are linux-raw-sys's, generated from the
//! kernel headers.

// `ioctl(2)` is unsafe in rustix: it cannot know what the driver reads or
// writes through the argument. Each call below says why it is sound.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use linux_raw_sys::loop_device as sys;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{ioctl, IntegerSetter, Ioctl, IoctlOutput, NoArg, Opcode, Setter};

use super::{MountError, Result};

/// The loop control device.
pub const LOOP_CONTROL: &str = "/dev/loop-control";

/// How many free devices [`attach`] tries before giving up, when other
/// processes keep taking the one it was given first (`EBUSY`).
const ATTACH_TRIES: usize = 64;

const CTL_GET_FREE: Opcode = sys::LOOP_CTL_GET_FREE as Opcode;
const CONFIGURE: Opcode = sys::LOOP_CONFIGURE as Opcode;
const CLR_FD: Opcode = sys::LOOP_CLR_FD as Opcode;
const SET_DIRECT_IO: Opcode = sys::LOOP_SET_DIRECT_IO as Opcode;

const LO_FLAGS_READ_ONLY: u32 = sys::LO_FLAGS_READ_ONLY as u32;
const LO_FLAGS_AUTOCLEAR: u32 = sys::LO_FLAGS_AUTOCLEAR as u32;
const LO_FLAGS_DIRECT_IO: u32 = sys::LO_FLAGS_DIRECT_IO as u32;

/// `LOOP_CTL_GET_FREE`, whose result (a device number) is the ioctl's
/// return value, which rustix's [`NoArg`] drops.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE (on /dev/loop-control) takes no argument: the
// kernel ignores the (null) pointer and reads or writes no user memory, so
// IS_MUTATING is false. Its result is the return value, which
// `output_from_ptr` only converts; the opcode is the kernel header's.
unsafe impl Ioctl for GetFree {
    type Output = u32;

    const IS_MUTATING: bool = false;

    fn opcode(&self) -> Opcode {
        CTL_GET_FREE
    }

    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::null_mut()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| Errno::RANGE)
    }
}

/// A loop device this process configured, with autoclear, and still holds
/// open. Dropping it closes the descriptor: the kernel then detaches the
/// device unless something else (a mount) still holds it, and then when
/// that lets go.
#[derive(Debug)]
pub struct LoopDevice {
    fd: OwnedFd,
    path: String,
}

impl LoopDevice {
    /// The device's path, `/dev/loopN`.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl AsFd for LoopDevice {
    /// The open device (what holds it attached until a mount does).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn loop_err(dev: &str, file: &Path, op: &'static str) -> impl FnOnce(Errno) -> MountError {
    let (dev, file) = (dev.to_string(), file.to_path_buf());
    move |e| MountError::Loop {
        dev,
        file,
        op,
        source: io::Error::from(e),
    }
}

/// The `LOOP_CONFIGURE` argument for backing file descriptor `fd`.
fn config(fd: &OwnedFd, file: &Path, direct_io: bool, writable: bool) -> Result<sys::loop_config> {
    // Shown by `losetup` (and LOOP_GET_STATUS64) for the device; cut to
    // the field's 63 bytes and a NUL, as losetup does.
    let mut name = [0u8; sys::LO_NAME_SIZE as usize];
    let bytes = file.as_os_str().as_bytes();
    let n = bytes.len().min(name.len() - 1);
    name[..n].copy_from_slice(&bytes[..n]);
    let mut flags = LO_FLAGS_AUTOCLEAR;
    if !writable {
        flags |= LO_FLAGS_READ_ONLY;
    }
    if direct_io {
        flags |= LO_FLAGS_DIRECT_IO;
    }
    let fd = u32::try_from(fd.as_raw_fd()).map_err(|_| MountError::Loop {
        dev: LOOP_CONTROL.into(),
        file: file.to_path_buf(),
        op: "backing file descriptor",
        source: io::Error::from(Errno::BADF),
    })?;
    Ok(sys::loop_config {
        fd,
        // The kernel's default: 512, or with direct I/O the backing file's
        // alignment (as losetup without --sector-size).
        block_size: 0,
        info: sys::loop_info64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: name,
            lo_crypt_name: [0; sys::LO_NAME_SIZE as usize],
            lo_encrypt_key: [0; sys::LO_KEY_SIZE as usize],
            lo_init: [0; 2],
        },
        __reserved: [0; 8],
    })
}

/// Attaches `file` read-only (or read-write if `writable`), with
/// autoclear, to a free loop device (see the module docs), with direct I/O
/// if `direct_io` (the kernel quietly falls back to buffered I/O where the
/// file does not support it). If `random`, the device reads the file with
/// no readahead of the file's own (`POSIX_FADV_RANDOM` on the descriptor
/// it is given, for as long as it keeps it): a read through the page
/// cache asks the file for exactly the pages it misses.
pub fn attach(file: &Path, direct_io: bool, writable: bool, random: bool) -> Result<LoopDevice> {
    let access = if writable {
        OFlags::RDWR
    } else {
        OFlags::RDONLY
    };
    let backing = rustix::fs::open(file, access | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
        MountError::Io {
            path: file.to_path_buf(),
            source: e.into(),
        }
    })?;
    if random {
        rustix::fs::fadvise(&backing, 0, None, rustix::fs::Advice::Random).map_err(|e| {
            MountError::Io {
                path: file.to_path_buf(),
                source: e.into(),
            }
        })?;
    }
    let control = rustix::fs::open(LOOP_CONTROL, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(loop_err(LOOP_CONTROL, file, "open"))?;
    let cfg = config(&backing, file, direct_io, writable)?;
    let mut last = Errno::BUSY;
    for _ in 0..ATTACH_TRIES {
        // SAFETY: `control` is /dev/loop-control, whose driver implements
        // LOOP_CTL_GET_FREE as `GetFree` describes.
        let n = unsafe { ioctl(&control, GetFree) }.map_err(loop_err(
            LOOP_CONTROL,
            file,
            "LOOP_CTL_GET_FREE",
        ))?;
        let path = format!("/dev/loop{n}");
        // The kernel makes the device read-only unless it was opened for
        // writing too.
        let dev = match rustix::fs::open(&path, access | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            // Removed (LOOP_CTL_REMOVE) since we were given it.
            Err(e @ Errno::NXIO) => {
                last = e;
                continue;
            }
            Err(e) => return Err(loop_err(&path, file, "open")(e)),
        };
        // SAFETY: `dev` is a loop device (opened from the number the loop
        // driver gave us); LOOP_CONFIGURE copies a `struct loop_config`
        // from the pointer and writes nothing back. `Setter` passes a
        // pointer to `cfg`, a `loop_config` generated from the kernel's
        // header, alive for the call; its `fd` is `backing`, open until
        // after the call (the kernel takes its own reference).
        let configured = unsafe { ioctl(&dev, Setter::<CONFIGURE, sys::loop_config>::new(cfg)) };
        match configured {
            Ok(()) => return Ok(LoopDevice { fd: dev, path }),
            // Another process configured it between GET_FREE and now.
            Err(e @ Errno::BUSY) => last = e,
            Err(e) => return Err(loop_err(&path, file, "LOOP_CONFIGURE")(e)),
        }
    }
    Err(loop_err(
        LOOP_CONTROL,
        file,
        "no free loop device stayed free",
    )(last))
}

/// Detaches loop device `dev` from `file` (`LOOP_CLR_FD`): at once if
/// nothing else holds it open, else (it is mounted, say) when its last
/// opener closes it. Returns `false` if there was nothing to detach (no
/// such device, or not attached: `ENXIO`).
pub fn clear(dev: &str, file: &Path) -> Result<bool> {
    let fd = match rustix::fs::open(dev, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NXIO) => return Ok(false),
        Err(e) => {
            return Err(MountError::Io {
                path: dev.into(),
                source: e.into(),
            })
        }
    };
    // SAFETY: LOOP_CLR_FD takes no argument and touches no user memory,
    // as `NoArg` says, which passes a null pointer: even a driver that
    // read the number otherwise could write nothing of ours through it.
    // (Callers pass loop devices: `detach_loop` checks
    // /sys/block/NAME/loop/backing_file first.)
    match unsafe { ioctl(&fd, NoArg::<CLR_FD>::new()) } {
        Ok(()) => Ok(true),
        Err(Errno::NXIO) => Ok(false),
        Err(e) => Err(loop_err(dev, file, "LOOP_CLR_FD")(e)),
    }
}

/// Loop devices' block major (`LOOP_MAJOR` in `linux/major.h`).
const LOOP_MAJOR: u32 = 7;

/// Opens loop device `dev` (named for errors with its backing `file`),
/// checking that it is one. While the descriptor is open the device keeps
/// the file it has now: a detach (`LOOP_CLR_FD`, or autoclear when its
/// filesystem is unmounted) waits for the last close. `Ok(None)` if the
/// device is gone.
pub fn open_loop(dev: &str, file: &Path) -> Result<Option<OwnedFd>> {
    let fd = match rustix::fs::open(dev, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NXIO | Errno::NODEV) => return Ok(None),
        Err(e) => return Err(loop_err(dev, file, "open")(e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(loop_err(dev, file, "fstat"))?;
    let is_block =
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::BlockDevice;
    if !is_block || rustix::fs::major(st.st_rdev) != LOOP_MAJOR {
        return Err(MountError::Loop {
            dev: dev.into(),
            file: file.into(),
            op: "open",
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a loop device"),
        });
    }
    Ok(Some(fd))
}

/// Turns direct I/O of the loop device open as `fd` ([`open_loop`]; `dev`,
/// backed by `file`, named for errors) on or off (`LOOP_SET_DIRECT_IO`),
/// while it stays mounted.
pub fn set_direct_io(fd: BorrowedFd<'_>, dev: &str, file: &Path, on: bool) -> Result<()> {
    // SAFETY: LOOP_SET_DIRECT_IO takes its argument by value, an unsigned
    // long that is 0 or 1 here, and reads or writes no user memory; the
    // opcode is the kernel header's, and `fd` is a loop device
    // ([`open_loop`] checked its type and major), so the loop driver's
    // handler is the one that runs.
    let set = unsafe { IntegerSetter::<SET_DIRECT_IO>::new_usize(usize::from(on)) };
    // SAFETY: as above.
    unsafe { ioctl(fd, set) }.map_err(loop_err(dev, file, "LOOP_SET_DIRECT_IO"))
}
