//! `apex-loadtest`: the load-test harness. It speaks only HTTP to loopback addresses.
//! Today it has the `null-server`, the ceiling every server figure is compared against;
//! the load modes and the verifier build on it.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "apex-loadtest",
    version,
    about = "Load-test harness for apex-server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A bare hyper server that reads each body and answers 200 `{"success":true}`:
    /// the ceiling to compare apex-server against, on the same client and machine.
    NullServer {
        /// Loopback address to listen on.
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
}

fn main() -> Result<(), String> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    match cli.command {
        Command::NullServer { listen } => {
            if !listen.ip().is_loopback() {
                return Err(format!(
                    "refusing to listen on {listen}: loopback addresses only"
                ));
            }
            runtime.block_on(null_server(listen))
        }
    }
}

async fn null_server(listen: SocketAddr) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!(
        "null-server listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                        // Read the whole body, as a real server must, so the comparison is fair.
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"success\":true}"))))
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}
