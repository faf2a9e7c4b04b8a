//! `apex-server`: reads its configuration, sets up logging, starts the durable pipeline (the
//! write-ahead log and its appliers), binds, and runs the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use apex_core::env::EnvSource;
use apex_core::process;
use apex_ingest::{ServerConfig, run_with_sink};
use apex_pipeline::durable::DurableSink;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long, in milliseconds, mimalloc keeps a freed page committed before returning it to
/// the kernel. mimalloc 3's built-in 1,000 ms kept the appliers' large batches and every burst
/// of requests resident; 10 ms is the value mimalloc's header documents (and mimalloc 2's
/// default). With [`no_transparent_huge_pages`] it brought RSS under overload within issue
/// 19's 384 MiB at no CPU cost measurable on this machine (BENCHMARKS.md, "Edge efficiency
/// (issue 19)"). A value from the environment (`MIMALLOC_PURGE_DELAY`, read by mimalloc at
/// load, in any case or under its legacy name) still wins.
const PURGE_DELAY_MS: std::ffi::c_long = 10;

/// `mi_option_purge_delay`'s index in mimalloc.h's option enum (15 in mimalloc 2 and 3);
/// libmimalloc-sys does not name it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes [`PURGE_DELAY_MS`] mimalloc's purge delay unless the environment set one. Call it
/// first thing in `main`, before any other thread exists.
#[allow(unsafe_code)]
fn purge_freed_pages_promptly() {
    // SAFETY: `mi_option_set_default` writes an integer into mimalloc's option table (plain,
    // not atomic) unless the option was initialised from the environment: no pointers, no
    // preconditions, and no other thread runs yet to read the table concurrently.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// Turns transparent huge pages off for the whole process (`prctl(PR_SET_THP_DISABLE)`, a flag
/// on its address space, so every thread and later fault), unless `MIMALLOC_ALLOW_THP` is set:
/// that is mimalloc's own option, `0` turns them off as this does, `1` leaves them on. mimalloc
/// asks for huge pages on its arenas, and the kernel's khugepaged then backs a whole 2 MiB
/// range once any of its 4 KiB pages is in use (its default `max_ptes_none` is 511), which
/// undoes the purge: RSS under overload wandered from 330 to 457 MiB between runs of the same
/// binary, and sat 15 MiB higher at idle.
///
/// # Errors
/// The prctl's, e.g. where a seccomp filter refuses it; the server then runs as before, with
/// more memory.
fn no_transparent_huge_pages() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        rustix::thread::disable_transparent_huge_pages(true)?;
    }
    Ok(())
}

fn main() -> ExitCode {
    purge_freed_pages_promptly();
    process::init_logging();
    if let Err(e) = no_transparent_huge_pages() {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off: RSS may be higher");
    }
    let config = match ServerConfig::from_env(&EnvSource::process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apex-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match process::runtime("apex-server") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "apex-server: cannot listen on APEX_LISTEN {}: {e}",
                    config.listen
                );
                return ExitCode::FAILURE;
            }
        };
        // The recorder first: the sink records from its start (a torn tail cut, its
        // zero-valued series), and nothing recorded before a recorder exists is kept.
        apex_ingest::telemetry::prometheus();
        // The production sink: the write-ahead log and one applier per store. Tests pass
        // their own sink to the same `run_with_sink`, which shuts it down at the end.
        let sink = match DurableSink::start(&config.durable_config()) {
            Ok(sink) => sink,
            Err(e) => {
                eprintln!("apex-server: cannot start the pipeline: {e}");
                return ExitCode::FAILURE;
            }
        };
        match run_with_sink(config, listener, sink, process::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apex-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(unsafe_code)]
    fn purge_delay() -> std::ffi::c_long {
        // SAFETY: `mi_option_get` reads an integer from mimalloc's option table.
        unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
    }

    #[test]
    fn the_allocator_returns_freed_pages_after_ten_milliseconds() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the operator's value stands; nothing of ours to check
        }
        // mimalloc 3's default for this index is 1,000 ms: this is the purge delay option.
        assert_eq!(
            purge_delay(),
            1000,
            "option {MI_OPTION_PURGE_DELAY} is not the purge delay"
        );
        purge_freed_pages_promptly();
        assert_eq!(purge_delay(), PURGE_DELAY_MS);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn transparent_huge_pages_are_off_for_the_server() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
            return; // the operator's choice stands
        }
        // The flag is inherited: start from "on", whatever the parent process chose.
        rustix::thread::disable_transparent_huge_pages(false).expect("prctl");
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(false)
        );
        no_transparent_huge_pages().expect("prctl(PR_SET_THP_DISABLE)");
        assert_eq!(
            rustix::thread::transparent_huge_pages_are_disabled().ok(),
            Some(true)
        );
    }
}
