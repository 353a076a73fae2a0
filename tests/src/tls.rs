//! TLS fixtures for the real-Envoy tests: a throw-away PKI generated at run
//! time with the `openssl` command (Debian package `openssl`), and clients
//! that speak TLS the way a user would (`openssl s_client`, `curl`).
//!
//! ```no_run
//! use meshpatterns_tests::tls::{Pki, Tls};
//! let pki = Pki::generate("tls"); // CA, server certs, client certs, a rogue CA
//! let probe = Tls::new(8443).ca(&pki.ca_cert()).version("-tls1_3").probe();
//! assert!(probe.established);
//! ```
//!
//! Every key is ECDSA P-256; every certificate is valid for two days.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The hostnames the generated server certificates are issued for.
pub const APP_HOST: &str = "app.meshpatterns.test";
pub const SNI_HOST_A: &str = "shop.meshpatterns.test";
pub const SNI_HOST_B: &str = "api.meshpatterns.test";

/// A directory of PEM files:
///
/// | file | what |
/// |---|---|
/// | `ca.crt`, `ca.key` | the trusted CA |
/// | `<host>.crt`, `<host>.key` | server certs (CN and SAN = host) for [`APP_HOST`], [`SNI_HOST_A`], [`SNI_HOST_B`] |
/// | `client.crt`, `client.key` | a client cert (CN `client.meshpatterns.test`) signed by the CA |
/// | `rogue-ca.crt`, `rogue-client.crt`, `rogue-client.key` | a second CA and a client cert it signed (must be refused) |
pub struct Pki {
    pub dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl ({e}); install the Debian package `openssl`"));
    assert!(out.status.success(), "openssl {} failed:\n{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl Pki {
    /// Generate the whole PKI into a fresh scratch directory.
    pub fn generate(prefix: &str) -> Pki {
        Pki::generate_in(crate::paths::scratch(prefix))
    }

    pub fn generate_in(dir: PathBuf) -> Pki {
        let pki = Pki { dir };
        pki.ca("ca", "meshpatterns test CA");
        pki.ca("rogue-ca", "rogue CA");
        for host in [APP_HOST, SNI_HOST_A, SNI_HOST_B] {
            pki.leaf("ca", host, host, "serverAuth");
        }
        pki.leaf("ca", "client", "client.meshpatterns.test", "clientAuth");
        pki.leaf("rogue-ca", "rogue-client", "client.meshpatterns.test", "clientAuth");
        pki
    }

    fn ca(&self, name: &str, cn: &str) {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    fn leaf(&self, ca: &str, name: &str, cn: &str, usage: &str) {
        let ext = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\nsubjectAltName=DNS:{cn}\n"),
        )
        .expect("write extensions file");
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.crt"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.file("ca.crt")
    }
    pub fn rogue_ca_cert(&self) -> PathBuf {
        self.file("rogue-ca.crt")
    }
    /// `(cert, key)` of the client signed by the trusted CA.
    pub fn client(&self) -> (PathBuf, PathBuf) {
        (self.file("client.crt"), self.file("client.key"))
    }
    /// `(cert, key)` of the client signed by the rogue CA.
    pub fn rogue_client(&self) -> (PathBuf, PathBuf) {
        (self.file("rogue-client.crt"), self.file("rogue-client.key"))
    }
}

/// A TLS client aimed at `127.0.0.1:<port>`: a handshake probe with
/// `openssl s_client`, or an HTTPS request with `curl`.
#[derive(Clone)]
pub struct Tls {
    port: u16,
    sni: String,
    ca: Option<PathBuf>,
    client: Option<(PathBuf, PathBuf)>,
    version: Option<&'static str>,
}

/// What `openssl s_client` saw.
#[derive(Debug)]
pub struct Probe {
    /// The handshake completed and the server certificate verified.
    pub established: bool,
    /// `TLSv1.2`, `TLSv1.3`, ... ("" when no handshake).
    pub protocol: String,
    /// Subject of the certificate the server presented, e.g. `CN = app.meshpatterns.test` ("" when none).
    pub subject: String,
    /// Everything s_client printed.
    pub output: String,
}

/// What `curl` got.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (0 = an HTTP response was received).
    pub exit: i32,
    /// HTTP status (0 when none).
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    pub stderr: String,
}

impl Curl {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

impl Tls {
    /// A client for `127.0.0.1:port` sending SNI [`APP_HOST`].
    pub fn new(port: u16) -> Tls {
        Tls { port, sni: APP_HOST.into(), ca: None, client: None, version: None }
    }
    /// The server name sent in SNI (and in the Host header with curl).
    pub fn sni(mut self, host: &str) -> Tls {
        self.sni = host.into();
        self
    }
    /// Trust this CA (the server certificate must verify against it).
    pub fn ca(mut self, ca: &Path) -> Tls {
        self.ca = Some(ca.to_path_buf());
        self
    }
    /// Present this client certificate.
    pub fn client_cert(mut self, (cert, key): (PathBuf, PathBuf)) -> Tls {
        self.client = Some((cert, key));
        self
    }
    /// Pin the protocol: `-tls1_1`, `-tls1_2` or `-tls1_3` (s_client flag names).
    pub fn version(mut self, v: &'static str) -> Tls {
        self.version = Some(v);
        self
    }

    /// Handshake with `openssl s_client -brief` and report what was negotiated.
    /// TLS 1.1 is attempted at OpenSSL security level 0, so that a refusal
    /// comes from the server and not from the client's own policy.
    pub fn probe(&self) -> Probe {
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-brief", "-verify_return_error", "-connect", &format!("127.0.0.1:{}", self.port), "-servername", &self.sni]);
        if let Some(ca) = &self.ca {
            cmd.arg("-CAfile").arg(ca);
        }
        if let Some((c, k)) = &self.client {
            cmd.arg("-cert").arg(c).arg("-key").arg(k);
        }
        if let Some(v) = self.version {
            cmd.arg(v);
            if v == "-tls1_1" {
                cmd.args(["-cipher", "DEFAULT@SECLEVEL=0"]);
            }
        }
        let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run openssl s_client ({e})"));
        let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let field = |name: &str| output.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default();
        Probe {
            established: output.contains("CONNECTION ESTABLISHED") && output.contains("Verification: OK"),
            protocol: field("Protocol version:"),
            subject: field("Peer certificate:"),
            output,
        }
    }

    /// `curl https://<sni>:<port><path>` resolved to 127.0.0.1, with the
    /// configured CA, client certificate and protocol pin.
    pub fn get(&self, path: &str) -> Curl {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-D", "-", "--max-time", "20", "--resolve", &format!("{}:{}:127.0.0.1", self.sni, self.port)]);
        if let Some(ca) = &self.ca {
            cmd.arg("--cacert").arg(ca);
        }
        if let Some((c, k)) = &self.client {
            cmd.arg("--cert").arg(c).arg("--key").arg(k);
        }
        match self.version {
            Some("-tls1_1") => cmd.args(["--tlsv1.1", "--tls-max", "1.1", "--ciphers", "DEFAULT@SECLEVEL=0"]),
            Some("-tls1_2") => cmd.args(["--tlsv1.2", "--tls-max", "1.2"]),
            Some("-tls1_3") => cmd.args(["--tlsv1.3", "--tls-max", "1.3"]),
            _ => &mut cmd,
        };
        cmd.arg(format!("https://{}:{}{path}", self.sni, self.port));
        let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run curl ({e}); install the Debian package `curl`"));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string())).collect();
        Curl {
            exit: out.status.code().unwrap_or(-1),
            status,
            headers,
            body: body.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}
