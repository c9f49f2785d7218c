//! nbdhost: an NBD server whose backends and filters are plugins.

mod config;
mod error;
mod export;
mod loader;
mod pipeline;
mod plugins_cmd;
mod protocol;
mod server;
mod tls;
mod transport;

use clap::Parser;
use config::MainConfig;
use export::ExportSet;
use loader::PluginDirectory;
use server::{Server, ServerSettings};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Serve block devices over NBD through backend and filter plugins.
#[derive(Parser, Debug)]
#[command(name = "nbdhost", version, about)]
struct Cli {
    /// Main configuration file (TOML); flags override it.
    #[arg(short = 'C', long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TCP address to listen on (repeatable). Port 0 picks a free port.
    /// Default: 0.0.0.0:10809, unless only --unix is given.
    #[arg(short, long, value_name = "HOST:PORT")]
    listen: Vec<String>,
    /// Listen on this Unix socket.
    #[arg(short = 'U', long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Directory to find plugins in (repeatable; searched in order).
    /// Default: the directory holding the nbdhost executable.
    #[arg(short = 'P', long = "plugin-dir", value_name = "DIR", global = true)]
    plugin_dir: Vec<PathBuf>,
    /// Directory of export snippets (*.toml). Default: /etc/nbdhost/exports.d
    #[arg(short = 'e', long, value_name = "DIR")]
    exports_dir: Option<PathBuf>,
    /// error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Export served to clients asking for the empty name.
    #[arg(long, value_name = "NAME")]
    default_export: Option<String>,
    /// Seconds a client may take to finish the handshake.
    #[arg(long, value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Most simultaneous client connections.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// TLS: off (default), on (STARTTLS offered; exports with
    /// `tls = "required"` need it) or require (every client must use TLS).
    #[arg(long, value_name = "MODE")]
    tls: Option<String>,
    /// TLS certificate directory: ca-cert.pem, server-cert.pem,
    /// server-key.pem and optionally ca-crl.pem (the nbdkit/libnbd layout).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Server certificate chain (PEM), instead of the directory's.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM), instead of the directory's.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// CA certificate(s) client certificates must chain to (PEM).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Certificate revocation list(s) (PEM), instead of the directory's.
    #[arg(long, value_name = "FILE")]
    tls_crl: Option<PathBuf>,
    /// Require client certificates signed by the CA (mutual TLS).
    #[arg(long)]
    tls_verify_peer: bool,
    /// TLS-PSK key file: not supported (rustls has no external PSK); refused.
    #[arg(long, value_name = "FILE")]
    tls_psk: Option<PathBuf>,
    /// Show debug messages of this plugin (repeatable).
    #[arg(long, value_name = "PLUGIN")]
    plugin_debug: Vec<String>,
    /// Validate the configuration (snippets, plugins, parameters) and exit.
    #[arg(long)]
    check: bool,
    #[command(subcommand)]
    command: Option<plugins_cmd::Command>,
}

fn default_plugin_dirs() -> Vec<PathBuf> {
    // Next to the executable: that is where `cargo build` puts the bundled
    // plugins, and where a package would install them alongside.
    let mut dirs = Vec::new();
    if let Some(d) = std::env::current_exe().ok().and_then(|p| p.parent().map(|p| p.to_path_buf())) {
        dirs.push(d.join("plugins"));
        dirs.push(d);
    }
    dirs.push(PathBuf::from("/usr/lib/nbdhost/plugins"));
    dirs
}

fn init_logging(level: &str) -> Result<(), String> {
    let filter: log::LevelFilter =
        level.parse().map_err(|_| format!("--log-level: `{level}` is not one of error, warn, info, debug, trace"))?;
    let cfg = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(log::LevelFilter::Off)
        .set_target_level(log::LevelFilter::Off)
        .build();
    simplelog::TermLogger::init(filter, cfg, simplelog::TerminalMode::Stderr, simplelog::ColorChoice::Never)
        .map_err(|e| format!("cannot set up logging: {e}"))
}

fn run(cli: Cli) -> Result<(), String> {
    let file = match &cli.config {
        Some(p) => MainConfig::load(p).map_err(|e| e.to_string())?,
        None => MainConfig::default(),
    };
    init_logging(cli.log_level.as_deref().or(file.log_level.as_deref()).unwrap_or("info"))?;

    let plugin_dirs = if !cli.plugin_dir.is_empty() {
        cli.plugin_dir.clone()
    } else {
        file.plugin_dir.clone().unwrap_or_else(default_plugin_dirs)
    };
    let exports_dir =
        cli.exports_dir.clone().or(file.exports_dir.clone()).unwrap_or_else(|| PathBuf::from("/etc/nbdhost/exports.d"));
    let mut debug = cli.plugin_debug.clone();
    debug.extend(file.plugin_debug.clone().unwrap_or_default());
    let plugins = PluginDirectory::new(plugin_dirs, debug);
    if let Some(plugins_cmd::Command::Plugins { name }) = &cli.command {
        return plugins_cmd::run(name.as_deref(), &plugins);
    }
    let default_export = cli.default_export.clone().or(file.default_export.clone());

    if cli.check {
        loader::set_checking_only();
    }
    let specs = config::load_snippets(&exports_dir).map_err(|e| e.to_string())?;
    let exports = ExportSet::build(&specs, &plugins, default_export.clone()).map_err(|e| e.to_string())?;
    if exports.is_empty() {
        return Err(format!("{}: no exports defined (add a *.toml snippet)", exports_dir.display()));
    }
    for e in exports.iter() {
        log::info!("export `{}`: {} ({})", e.name, e.describe(), e.spec.source.display());
    }
    let tls = tls::TlsOptions {
        mode: cli.tls.clone().or(file.tls.clone()),
        certificates: cli.tls_certificates.clone().or(file.tls_certificates.clone()),
        cert: cli.tls_cert.clone().or(file.tls_cert.clone()),
        key: cli.tls_key.clone().or(file.tls_key.clone()),
        ca: cli.tls_ca.clone().or(file.tls_ca.clone()),
        crl: cli.tls_crl.clone().or(file.tls_crl.clone()),
        verify_peer: cli.tls_verify_peer || file.tls_verify_peer.unwrap_or(false),
        psk: cli.tls_psk.clone().or(file.tls_psk.clone()),
    }
    .build()?;
    tls::check_exports(tls.as_deref(), &exports)?;
    if cli.check {
        println!("configuration OK: {} export(s) from {}", exports.len(), exports_dir.display());
        return Ok(());
    }

    let unix = cli.unix.clone().or(file.unix.clone());
    let mut listen = if !cli.listen.is_empty() { cli.listen.clone() } else { file.listen.clone().unwrap_or_default() };
    if listen.is_empty() && unix.is_none() {
        listen.push("0.0.0.0:10809".into());
    }
    let settings = ServerSettings {
        listen,
        unix,
        handshake_timeout: Duration::from_secs(cli.handshake_timeout.or(file.handshake_timeout).unwrap_or(30)),
        max_connections: cli.max_connections.or(file.max_connections).unwrap_or(1024),
        shutdown_grace: Duration::from_secs(10),
        shutdown_linger: Duration::from_secs(1),
        tls,
    };
    let server = Server::new(settings, exports);
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    server.start().map_err(|e| e.to_string())?;
    for sig in signals.forever() {
        if sig == SIGHUP {
            reload(&server, &exports_dir, &plugins, default_export.clone());
            continue;
        }
        log::info!("signal {sig} received");
        break;
    }
    server.shutdown();
    // Destroy the exports now (their plugins' destroy callbacks run: final
    // syncs, summaries) rather than leaving it to whichever thread drops
    // the last reference after main returns.
    server.replace_exports(ExportSet::default());
    log::info!("bye");
    Ok(())
}

/// SIGHUP: re-read the exports directory. Connected clients are never
/// dropped; a broken snippet keeps the running configuration.
fn reload(server: &Server, dir: &std::path::Path, plugins: &PluginDirectory, default: Option<String>) {
    log::info!("SIGHUP: reloading {}", dir.display());
    server.reload_tls();
    let result =
        config::load_snippets(dir).and_then(|specs| ExportSet::rebuild(&specs, plugins, default, &server.exports()));
    match result {
        Ok((exports, s)) => {
            if let Err(e) = tls::check_exports(server.tls(), &exports) {
                for line in e.lines() {
                    log::error!("reload refused, keeping the running configuration: {line}");
                }
                return;
            }
            server.replace_exports(exports);
            log::info!(
                "reload done: {} kept, added [{}], changed [{}], removed [{}]",
                s.kept.len(),
                s.added.join(", "),
                s.changed.join(", "),
                s.removed.join(", ")
            );
        }
        Err(e) => {
            for line in e.to_string().lines() {
                log::error!("reload refused, keeping the running configuration: {line}");
            }
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdhost: {e}");
            ExitCode::FAILURE
        }
    }
}
