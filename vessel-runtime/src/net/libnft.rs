//! nftables in process: `libnftables`, the library behind the `nft` tool
//! (same parser, same single-transaction commit), loaded at run time.
//! A script costs ~0.6 ms here against ~4.7 ms for `nft -f` (most of
//! which is starting the tool), and a vessel's start, policy changes and
//! every address its resolver admits each run one. No crate wraps the
//! library; the eight calls used here are bound by hand.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::sync::{Mutex, OnceLock};

use vessel_core::sync::Locked;

/// `NFT_CTX_DEFAULT`.
const CTX_DEFAULT: u32 = 0;
/// `NFT_CTX_OUTPUT_JSON`.
const OUTPUT_JSON: c_uint = 1 << 4;

type New = unsafe extern "C" fn(u32) -> *mut c_void;
type Free = unsafe extern "C" fn(*mut c_void);
type Run = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type Buffer = unsafe extern "C" fn(*mut c_void) -> c_int;
type Get = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type Flags = unsafe extern "C" fn(*mut c_void, c_uint);

/// The library and its calls, resolved once.
struct Lib {
    new: New,
    free: Free,
    run: Run,
    buffer_output: Buffer,
    buffer_error: Buffer,
    output: Get,
    error: Get,
    set_output_flags: Flags,
    /// Kept loaded for the life of the process (the calls point into it).
    _lib: libloading::Library,
}

/// One call at a time: the library does not promise that contexts on
/// different threads are independent.
static CALLS: Mutex<()> = Mutex::new(());

fn lib() -> Option<&'static Lib> {
    static LIB: OnceLock<Option<Lib>> = OnceLock::new();
    LIB.get_or_init(|| match load() {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::debug!(error = %e, "libnftables is not loadable");
            None
        }
    })
    .as_ref()
}

fn load() -> Result<Lib, libloading::Error> {
    // SAFETY: libnftables' initialisers have no preconditions, and every
    // symbol is given its C signature from <nftables/libnftables.h>.
    unsafe {
        let lib = libloading::Library::new("libnftables.so.1")?;
        Ok(Lib {
            new: *lib.get::<New>(b"nft_ctx_new\0")?,
            free: *lib.get::<Free>(b"nft_ctx_free\0")?,
            run: *lib.get::<Run>(b"nft_run_cmd_from_buffer\0")?,
            buffer_output: *lib.get::<Buffer>(b"nft_ctx_buffer_output\0")?,
            buffer_error: *lib.get::<Buffer>(b"nft_ctx_buffer_error\0")?,
            output: *lib.get::<Get>(b"nft_ctx_get_output_buffer\0")?,
            error: *lib.get::<Get>(b"nft_ctx_get_error_buffer\0")?,
            set_output_flags: *lib.get::<Flags>(b"nft_ctx_output_set_flags\0")?,
            _lib: lib,
        })
    }
}

/// Whether the library loads (Debian: libnftables1, which nftables needs).
pub(super) fn available() -> bool {
    lib().is_some()
}

/// Runs `script` as one transaction in the calling thread's network
/// namespace: its output (JSON when `json`), or nft's error message.
pub(super) fn run(script: &str, json: bool) -> Result<String, String> {
    let lib = lib().ok_or_else(|| "libnftables is not installed".to_owned())?;
    let script = CString::new(script).map_err(|_| "a script with a NUL byte".to_owned())?;
    let _one = CALLS.locked();
    // SAFETY: the context is made, used and freed here, by one thread
    // under CALLS; the buffers it returns are copied before it is freed.
    unsafe {
        let ctx = (lib.new)(CTX_DEFAULT);
        if ctx.is_null() {
            return Err("nft_ctx_new failed".into());
        }
        (lib.buffer_output)(ctx);
        (lib.buffer_error)(ctx);
        if json {
            (lib.set_output_flags)(ctx, OUTPUT_JSON);
        }
        let status = (lib.run)(ctx, script.as_ptr());
        let text = |p: *const c_char| {
            if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
        };
        let result =
            if status == 0 { Ok(text((lib.output)(ctx))) } else { Err(text((lib.error)(ctx)).trim().to_owned()) };
        (lib.free)(ctx);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_script_is_refused_with_nfts_message() {
        assert!(available(), "libnftables (with nftables) is a test prerequisite");
        // A syntax error fails in the parser, before any netlink call: no
        // privilege needed, nothing changed.
        let err = run("this is not nftables", false).unwrap_err();
        assert!(err.contains("syntax error"), "{err}");
        assert!(run("add table inet x\0", false).is_err());
    }
}
