//! bench peer: reads FRAMES frames from the connected sockets on descriptors 3 … 3+CONNECTIONS-1
//! (handed over by bench's reader child, as to the NIO and asyncio peers), each connection a
//! task reading `FramedRead<_, LengthDelimitedCodec>` (4-byte big-endian length, the header
//! stripped), checks each body's length and marks, and prints bench's CaseResult JSON line.
//!
//! STRATEGY `tokio-1`: the current_thread runtime (one thread); `tokio-N`: the multi-thread
//! runtime with N workers.
//!
//! usage: tokio-peer STRATEGY TRANSPORT FRAME_BYTES FRAMES [CONNECTIONS]

use futures_util::StreamExt;
use std::os::unix::io::FromRawFd;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::LengthDelimitedCodec;

fn status(key: &str) -> i64 {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(key).and_then(|r| r.strip_prefix(':')) {
            return rest.split_whitespace().next().and_then(|v| v.parse::<i64>().ok()).unwrap_or(-1) * 1024;
        }
    }
    -1
}

fn cpu() -> (f64, f64) {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    (
        ru.ru_utime.tv_sec as f64 + ru.ru_utime.tv_usec as f64 / 1e6,
        ru.ru_stime.tv_sec as f64 + ru.ru_stime.tv_usec as f64 / 1e6,
    )
}

fn body_ok(b: &[u8], n: usize) -> bool {
    b.len() == n && !((n >= 1 && b[0] != 0x11) || (n >= 2 && b[n - 1] != 0x22) || (n >= 3 && b[n / 2] != 0x33))
}

async fn read_frames<S: AsyncRead + AsyncWrite + Unpin>(stream: S, n: usize, per: usize) -> Result<usize, String> {
    let mut frames = LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(1 << 30)
        .new_read(stream);
    let mut got = 0;
    while got < per {
        match frames.next().await {
            Some(Ok(body)) => {
                if !body_ok(&body, n) {
                    return Err(format!("frame {} of {} bytes: length or marks wrong", got, body.len()));
                }
                got += 1;
            }
            Some(Err(e)) => return Err(e.to_string()),
            None => break,
        }
    }
    Ok(got)
}

async fn read_connection(fd: i32, unix: bool, n: usize, per: usize) -> Result<usize, String> {
    if unix {
        let s = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        read_frames(tokio::net::UnixStream::from_std(s).map_err(|e| e.to_string())?, n, per).await
    } else {
        let s = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        read_frames(tokio::net::TcpStream::from_std(s).map_err(|e| e.to_string())?, n, per).await
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parsed = (args.len() >= 5)
        .then(|| Some((args[3].parse::<usize>().ok()?, args[4].parse::<usize>().ok()?)))
        .flatten();
    let Some((n, frames)) = parsed else {
        eprintln!("usage: tokio-peer STRATEGY TRANSPORT FRAME_BYTES FRAMES [CONNECTIONS]");
        std::process::exit(2);
    };
    let strategy = args[1].clone();
    let transport = args[2].clone();
    let connections = args.get(5).and_then(|c| c.parse::<usize>().ok()).unwrap_or(1).max(1);
    let threads = strategy.rsplit('-').next().and_then(|t| t.parse::<usize>().ok()).unwrap_or(1).max(1);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_io().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_io().build()
    }
    .expect("tokio runtime");
    let per = frames / connections;
    let unix = transport == "unix";

    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let base = status("VmRSS");
    let (u0, s0) = cpu();
    let t0 = Instant::now();
    let result: Result<usize, String> = runtime.block_on(async move {
        let tasks: Vec<_> = (0..connections)
            .map(|k| tokio::spawn(read_connection(3 + k as i32, unix, n, per)))
            .collect();
        let mut got = 0;
        for t in tasks {
            got += t.await.map_err(|e| e.to_string())??;
        }
        Ok(got)
    });
    let secs = t0.elapsed().as_secs_f64();
    let (u1, s1) = cpu();
    let peak = status("VmHWM");
    drop(runtime);
    let got = match result {
        Ok(g) => g,
        Err(e) => {
            eprintln!("tokio-peer: {e}");
            std::process::exit(1);
        }
    };
    if got != per * connections {
        eprintln!("tokio-peer: read {got} of {frames} frames");
        std::process::exit(1);
    }
    let runtime_name = if threads == 1 { "current_thread runtime".to_string() } else { format!("multi_thread runtime, {threads} workers") };
    println!(
        "{{\"strategy\":\"{}\",\"transport\":\"{}\",\"frameBytes\":{},\"frames\":{},\"seconds\":{},\"gbPerSecond\":{},\"framesPerSecond\":{},\"peakRSSBytes\":{},\"baselineRSSBytes\":{},\"peakOverFrame\":{},\"cpuUserSeconds\":{},\"cpuSystemSeconds\":{},\"note\":\"tokio {} + tokio-util LengthDelimitedCodec, {} connection(s)\",\"connections\":{}}}",
        strategy, transport, n, got, secs,
        (n * got) as f64 / secs / 1e9, got as f64 / secs,
        peak, base, (peak - base) as f64 / n.max(1) as f64,
        u1 - u0, s1 - s0, runtime_name, connections, connections
    );
}
