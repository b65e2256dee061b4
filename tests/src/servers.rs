//! Private, TLS-enabled server instances for one test: NATS, Redis and PostgreSQL started from
//! their system binaries on free loopback ports in temp dirs, plus the certificates they use.
//!
//! Why: TLS, authentication and outage behaviour need servers configured in ways the shared
//! services on 4222/6379/5432 are not (and must never be, since every other test uses them).
//! Each instance lives as long as its value: dropping it stops the server and deletes its dir.
//! A server that does not come up within [`STARTUP_TIMEOUT`] fails the test with its log.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// How long a server gets to accept TCP connections before the test fails with its log.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// A private CA and certificates made for one test.
///
/// Why: TLS tests need a server certificate that real clients can verify against a CA the
/// test controls (and a CA that must *not* verify it), without touching the system trust store.
/// All files are PEM; private keys are PKCS#8 ECDSA P-256 with mode 0600.
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA that signed the server and client certificates: give it to clients as their root.
    pub ca_file: PathBuf,
    /// The server certificate, for `127.0.0.1`, `::1` and `localhost`, signed by [`Self::ca_file`].
    pub server_cert_file: PathBuf,
    /// The server certificate's private key.
    pub server_key_file: PathBuf,
    /// A client certificate with common name `sync-engine`, signed by [`Self::ca_file`], for
    /// mutual-TLS tests.
    pub client_cert_file: PathBuf,
    /// The client certificate's private key.
    pub client_key_file: PathBuf,
    /// A second CA that signed nothing here: a "wrong CA" for negative tests.
    pub other_ca_file: PathBuf,
}

impl TestPki {
    /// Makes a fresh CA, server and client certificates, and an unrelated CA, in a temp dir.
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new()
            .prefix("pki-")
            .tempdir()
            .expect("temp dir for the test PKI");

        let ca_key = KeyPair::generate().expect("generate the CA key");
        let ca = ca_params("sync-engine test CA")
            .self_signed(&ca_key)
            .expect("self-sign the CA");
        let other_ca_key = KeyPair::generate().expect("generate the other CA key");
        let other_ca = ca_params("sync-engine unrelated test CA")
            .self_signed(&other_ca_key)
            .expect("self-sign the other CA");

        let mut server_params = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "::1".to_string(),
            "localhost".to_string(),
        ])
        .expect("server certificate parameters");
        server_params.distinguished_name = common_name("sync-engine test server");
        server_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().expect("generate the server key");
        let server = server_params
            .signed_by(&server_key, &ca, &ca_key)
            .expect("sign the server certificate");

        let mut client_params =
            CertificateParams::new(Vec::<String>::new()).expect("client certificate parameters");
        client_params.distinguished_name = common_name("sync-engine");
        client_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate().expect("generate the client key");
        let client = client_params
            .signed_by(&client_key, &ca, &ca_key)
            .expect("sign the client certificate");

        let path = |name: &str| dir.path().join(name);
        let pki = TestPki {
            ca_file: path("ca.pem"),
            server_cert_file: path("server.pem"),
            server_key_file: path("server-key.pem"),
            client_cert_file: path("client.pem"),
            client_key_file: path("client-key.pem"),
            other_ca_file: path("other-ca.pem"),
            dir,
        };
        write_file(&pki.ca_file, &ca.pem(), 0o644);
        write_file(&pki.server_cert_file, &server.pem(), 0o644);
        write_file(&pki.server_key_file, &server_key.serialize_pem(), 0o600);
        write_file(&pki.client_cert_file, &client.pem(), 0o644);
        write_file(&pki.client_key_file, &client_key.serialize_pem(), 0o600);
        write_file(&pki.other_ca_file, &other_ca.pem(), 0o644);
        pki
    }

    /// The temp dir holding every file, so a test can put more files beside them.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate as PEM bytes, for clients that take the root in memory (Redis).
    pub fn ca_pem(&self) -> Vec<u8> {
        fs::read(&self.ca_file).expect("read the test CA")
    }
}

impl Default for TestPki {
    fn default() -> Self {
        TestPki::new()
    }
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.distinguished_name = common_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn
}

/// Creates (or truncates) `path` with `mode` and writes `contents` to it.
fn write_file(path: &Path, contents: &str, mode: u32) {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(contents.as_bytes())
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read it, release it).
///
/// Why: each test's servers need their own ports; there is a small race with other processes
/// taking the port before the server binds it, which is acceptable for tests.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address of a bound socket")
        .port()
}

/// Quotes `s` as a double-quoted string with escapes, valid in nats-server config syntax.
fn quoted(s: &str) -> String {
    serde_json::to_string(s).expect("quote a string")
}

fn read_log(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| format!("(no log at {}: {e})", path.display()))
}

/// A log file for a child's standard output and error, both appended to one file.
fn log_stdio(path: &Path) -> (Stdio, Stdio) {
    let file = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let err = file
        .try_clone()
        .unwrap_or_else(|e| panic!("clone the handle of {}: {e}", path.display()));
    (Stdio::from(file), Stdio::from(err))
}

/// Waits until 127.0.0.1:`port` accepts TCP. On timeout or when `child` exits first, kills
/// the child and panics with the log.
fn wait_for_port(name: &str, port: u16, mut child: Option<&mut Child>, log: &Path) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        if let Some(child) = child.as_deref_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{name} exited ({status}) before accepting connections on {addr}; log {}:\n{}",
                    log.display(),
                    read_log(log)
                );
            }
        }
        if Instant::now() >= deadline {
            if let Some(child) = child.as_deref_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!(
                "{name} did not accept connections on {addr} within {STARTUP_TIMEOUT:?}; log {}:\n{}",
                log.display(),
                read_log(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The server `mappings` block for the test and bench subjects (`<run>.user.<type>.<token>` and
/// `<run>.payload.user.<type>.<token>`, whatever the run's prefix): the partition of the user
/// token among `partitions`, as `[cluster] partitions` expects (README: "Running several
/// engines").
pub fn partition_mapping(partitions: u32) -> String {
    let map = |prefix: &str| {
        format!(
            "  \"*.{prefix}*.*\": \"{{{{wildcard(1)}}}}.{prefix}{{{{wildcard(2)}}}}.{{{{wildcard(3)}}}}.{{{{partition({partitions},3)}}}}\"\n"
        )
    };
    format!(
        "mappings = {{\n{}{}}}\n",
        map("user."),
        map("payload.user.")
    )
}

/// A nats-server of the test's own, with JetStream, on a free port; killed on drop.
///
/// Why: tests of TLS and authentication need a server with a `tls {}` or `authorization {}`
/// block, which the shared server on 4222 must not get.
pub struct NatsServer {
    /// The client port on 127.0.0.1.
    pub port: u16,
    /// The monitoring (HTTP) port on 127.0.0.1, when started with [`NatsServer::start_monitored`].
    pub monitor_port: Option<u16>,
    child: Child,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts `/usr/sbin/nats-server` (or the one on `PATH`) with `listen: "127.0.0.1:<port>"`
    /// and JetStream stored in its temp dir, and waits until the port accepts TCP.
    ///
    /// `extra` is appended to the server config (nats-server config syntax), e.g. a `tls {}` or
    /// `authorization {}` block.
    pub fn start(extra: &str) -> NatsServer {
        let dir = tempfile::Builder::new()
            .prefix("nats-")
            .tempdir()
            .expect("temp dir for nats-server");
        let port = free_port();
        let store_dir = dir.path().join("js");
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\n\
             jetstream {{\n  store_dir: {store}\n}}\n\
             {extra}\n",
            store = quoted(&store_dir.display().to_string()),
        );
        let config_path = dir.path().join("nats-server.conf");
        write_file(&config_path, &config, 0o600);
        let log = dir.path().join("nats-server.log");
        let (stdout, stderr) = log_stdio(&log);
        let binary = if Path::new("/usr/sbin/nats-server").exists() {
            PathBuf::from("/usr/sbin/nats-server")
        } else {
            PathBuf::from("nats-server")
        };
        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        wait_for_port("nats-server", port, Some(&mut child), &log);
        NatsServer {
            port,
            monitor_port: None,
            child,
            dir,
        }
    }

    /// A plain server whose monitoring endpoint (`/jsz`, `/connz`) listens on another free port,
    /// so a test can read what the server holds for a consumer (waiting pull requests, pending).
    pub fn start_monitored() -> NatsServer {
        let monitor_port = free_port();
        let mut server = NatsServer::start(&format!("http: \"127.0.0.1:{monitor_port}\"\n"));
        wait_for_port(
            "nats-server monitoring",
            monitor_port,
            Some(&mut server.child),
            &server.dir.path().join("nats-server.log"),
        );
        server.monitor_port = Some(monitor_port);
        server
    }

    /// A server that requires TLS (verified against `pki.ca_file` by clients; client
    /// certificates are not asked for) and the given user and password.
    pub fn start_tls_user_password(pki: &TestPki, user: &str, password: &str) -> NatsServer {
        NatsServer::start(&format!(
            "tls {{\n  cert_file: {cert}\n  key_file: {key}\n  ca_file: {ca}\n  verify: false\n}}\n\
             authorization {{\n  user: {user}\n  password: {password}\n}}\n",
            cert = quoted(&pki.server_cert_file.display().to_string()),
            key = quoted(&pki.server_key_file.display().to_string()),
            ca = quoted(&pki.ca_file.display().to_string()),
            user = quoted(user),
            password = quoted(password),
        ))
    }

    /// A plain-TCP server that requires the given token.
    pub fn start_token(token: &str) -> NatsServer {
        NatsServer::start(&format!(
            "authorization {{\n  token: {token}\n}}\n",
            token = quoted(token)
        ))
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The server's log so far, for assertions and failure messages.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("nats-server.log"))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A redis-server of the test's own, TLS only (`--port 0 --tls-port <p>`), optional
/// `requirepass`; killed on drop.
///
/// Why: the shared Redis on 6379 is plain TCP without a password; TLS and password handling
/// are tested here. No persistence (`--save "" --appendonly no`), bound to 127.0.0.1.
pub struct RedisServer {
    /// The TLS port on 127.0.0.1 (there is no plain port).
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` serving TLS with `pki`'s server certificate (client certificates
    /// are not asked for), requiring `password` when given, and waits until the port accepts
    /// TCP.
    pub fn start_tls(pki: &TestPki, password: Option<&str>) -> RedisServer {
        let dir = tempfile::Builder::new()
            .prefix("redis-")
            .tempdir()
            .expect("temp dir for redis-server");
        let port = free_port();
        let log = dir.path().join("redis-server.log");
        let (stdout, stderr) = log_stdio(&log);
        let mut command = Command::new("redis-server");
        command
            .args(["--port", "0", "--tls-port"])
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(&pki.server_cert_file)
            .arg("--tls-key-file")
            .arg(&pki.server_key_file)
            .arg("--tls-ca-cert-file")
            .arg(&pki.ca_file)
            .args(["--tls-auth-clients", "no"])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(dir.path());
        if let Some(password) = password {
            command.arg("--requirepass").arg(password);
        }
        let mut child = command
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start redis-server: {e}"));
        wait_for_port("redis-server", port, Some(&mut child), &log);
        RedisServer { port, child, dir }
    }

    /// `rediss://[:<password>@]127.0.0.1:<port>` (the password is not URL-encoded).
    pub fn url(&self, password: Option<&str>) -> String {
        match password {
            Some(password) => format!("rediss://:{password}@127.0.0.1:{}", self.port),
            None => format!("rediss://127.0.0.1:{}", self.port),
        }
    }

    /// The server's log so far, for assertions and failure messages.
    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("redis-server.log"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// The PostgreSQL binaries' dir, from `pg_config --bindir`.
fn pg_bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        let output = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .expect("run pg_config --bindir (is PostgreSQL installed?)");
        assert!(
            output.status.success(),
            "pg_config --bindir failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
    })
}

/// `runuser -u postgres -- <bindir>/<program>`: PostgreSQL refuses to run as root.
fn as_postgres(program: &str, cwd: &Path) -> Command {
    let mut command = Command::new("runuser");
    command
        .args(["-u", "postgres", "--"])
        .arg(pg_bindir().join(program))
        .current_dir(cwd)
        .stdin(Stdio::null());
    command
}

fn output_text(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Gives `path` and everything under it to the `postgres` user.
fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .expect("run chown");
    assert!(
        status.success(),
        "chown -R postgres:postgres {} failed",
        path.display()
    );
}

/// A PostgreSQL cluster of the test's own (initdb + pg_ctl in a temp dir), ssl=on with the
/// PKI's server cert; stopped (`pg_ctl stop -m immediate`) on drop.
///
/// Why: the shared server on 5432 accepts plain connections; this one only accepts TLS from
/// 127.0.0.1 (`hostssl ... trust`, `hostnossl ... reject`), so tests can prove the engine's
/// `sslmode` handling. The database is `test`, the user `postgres` (no password).
pub struct PostgresCluster {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    data_dir: PathBuf,
    log_file: PathBuf,
    dir: tempfile::TempDir,
}

impl PostgresCluster {
    /// Runs initdb and starts the cluster as the `postgres` user, then creates database `test`.
    pub fn start_ssl(pki: &TestPki) -> PostgresCluster {
        let dir = tempfile::Builder::new()
            .prefix("pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        let port = free_port();
        let root = dir.path();
        let data_dir = root.join("data");
        let log_file = root.join("postgres.log");
        let cert = root.join("server.crt");
        let key = root.join("server.key");
        fs::copy(&pki.server_cert_file, &cert).expect("copy the server certificate");
        fs::copy(&pki.server_key_file, &key).expect("copy the server key");
        fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod 0600 the server key");
        // The temp dir is 0700 root: hand it all to postgres so the server can reach its files.
        chown_postgres(root);

        let initdb = as_postgres("initdb", root)
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .expect("run initdb via runuser");
        assert!(
            initdb.status.success(),
            "initdb failed: {}",
            output_text(&initdb)
        );

        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "''"));
        let settings = format!(
            "\n# Added by the sync-engine tests.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {socket_dir}\n\
             ssl = on\n\
             ssl_cert_file = {cert}\n\
             ssl_key_file = {key}\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             max_connections = 30\n",
            socket_dir = quote(root),
            cert = quote(&cert),
            key = quote(&key),
        );
        let conf = data_dir.join("postgresql.conf");
        let mut file = OpenOptions::new()
            .append(true)
            .open(&conf)
            .unwrap_or_else(|e| panic!("open {}: {e}", conf.display()));
        file.write_all(settings.as_bytes())
            .unwrap_or_else(|e| panic!("write {}: {e}", conf.display()));
        // Overwriting keeps the file's owner (postgres) and mode.
        fs::write(
            data_dir.join("pg_hba.conf"),
            "# TYPE    DATABASE USER ADDRESS       METHOD\n\
             local     all      all                  trust\n\
             hostssl   all      all  127.0.0.1/32    trust\n\
             hostnossl all      all  127.0.0.1/32    reject\n",
        )
        .expect("write pg_hba.conf");

        let cluster = PostgresCluster {
            port,
            data_dir,
            log_file,
            dir,
        };
        let start = as_postgres("pg_ctl", cluster.dir.path())
            .arg("-D")
            .arg(&cluster.data_dir)
            .arg("-l")
            .arg(&cluster.log_file)
            .args(["-w", "-t"])
            .arg(STARTUP_TIMEOUT.as_secs().to_string())
            .arg("start")
            .output()
            .expect("run pg_ctl start via runuser");
        if !start.status.success() {
            // Drop stops whatever may have come up.
            panic!(
                "pg_ctl start failed: {}\nserver log:\n{}",
                output_text(&start),
                cluster.log()
            );
        }
        wait_for_port("postgres", port, None, &cluster.log_file);

        let createdb = as_postgres("createdb", cluster.dir.path())
            .arg("-h")
            .arg(cluster.dir.path())
            .arg("-p")
            .arg(port.to_string())
            .args(["-U", "postgres", "test"])
            .output()
            .expect("run createdb via runuser");
        assert!(
            createdb.status.success(),
            "createdb test failed: {}\nserver log:\n{}",
            output_text(&createdb),
            cluster.log()
        );
        cluster
    }

    /// `postgres://postgres@127.0.0.1:<port>/test?<query>` (no `?` when `query` is empty),
    /// e.g. `url("sslmode=verify-full&sslrootcert=/path/ca.pem")`.
    pub fn url(&self, query: &str) -> String {
        if query.is_empty() {
            format!("postgres://postgres@127.0.0.1:{}/test", self.port)
        } else {
            format!("postgres://postgres@127.0.0.1:{}/test?{query}", self.port)
        }
    }

    /// The server's log so far, for assertions and failure messages.
    pub fn log(&self) -> String {
        read_log(&self.log_file)
    }
}

impl Drop for PostgresCluster {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl", self.dir.path())
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
