//! Sidecar adding HTTPS to a legacy plain-HTTP app, its mTLS variant, and
//! SSL termination at the edge with two hostnames, through a real Envoy.
//! The PKI is generated at run time with `openssl`; clients are
//! `openssl s_client` (handshake facts) and `curl` (HTTPS requests).

use meshpatterns_tests::tls::{Pki, Tls, APP_HOST, SNI_HOST_A, SNI_HOST_B};
use meshpatterns_tests::{Client, Envoy, EnvoyBuilder, Upstream};

fn sidecar(pki: &Pki, app: &Upstream) -> EnvoyBuilder {
    EnvoyBuilder::new("tls-sidecar.yaml").var("CERT_DIR", pki.dir.display()).endpoints("APP", std::slice::from_ref(app))
}

fn start_sidecar() -> (Pki, Upstream, Envoy) {
    let pki = Pki::generate("tls");
    let app = Upstream::start("legacy-app");
    let envoy = sidecar(&pki, &app).start();
    (pki, app, envoy)
}

#[test]
fn https_with_tls_1_2_and_1_3_reaches_the_plain_http_app() {
    let (pki, app, envoy) = start_sidecar();
    let port = envoy.port("https");
    for (flag, name) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let client = Tls::new(port).ca(&pki.ca_cert()).version(flag);
        let p = client.probe();
        assert!(p.established, "{name} handshake failed:\n{}", p.output);
        assert_eq!(p.protocol, name, "{}", p.output);
        assert_eq!(p.subject, format!("CN = {APP_HOST}"), "{}", p.output);
        let r = client.get("/orders/7");
        assert_eq!((r.exit, r.status), (0, 200), "curl over {name}: {r:?}");
        assert_eq!(r.header("x-replica"), Some("legacy-app"));
        let echoed: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(echoed["path"], "/orders/7");
    }
    // Without a pin the newest version is chosen.
    assert_eq!(Tls::new(port).ca(&pki.ca_cert()).probe().protocol, "TLSv1.3");
    assert_eq!(app.hits(), 2);
}

#[test]
fn tls_1_1_is_refused_although_the_client_can_speak_it() {
    let (pki, app, envoy) = start_sidecar();
    let p = Tls::new(envoy.port("https")).ca(&pki.ca_cert()).version("-tls1_1").probe();
    assert!(!p.established, "TLS 1.1 handshake succeeded:\n{}", p.output);
    // The server answers the TLS 1.1 ClientHello with a protocol_version alert (70).
    assert!(p.output.contains("alert protocol version"), "{}", p.output);
    let r = Tls::new(envoy.port("https")).ca(&pki.ca_cert()).version("-tls1_1").get("/");
    assert_ne!(r.exit, 0, "{r:?}");
    assert_eq!(r.status, 0);
    assert_eq!(app.hits(), 0);

    // Control: the same client completes TLS 1.1 with an Envoy configured to
    // allow it (and a CBC cipher suite, which TLS 1.1 needs and Envoy's
    // defaults leave out), so the refusal above is the sidecar's policy.
    let lax = sidecar(&pki, &app)
        .replace(
            "tls_minimum_protocol_version: TLSv1_2",
            "tls_minimum_protocol_version: TLSv1_1\n              cipher_suites: [ECDHE-ECDSA-AES128-SHA, ECDHE-ECDSA-AES128-GCM-SHA256]",
        )
        .start();
    let p = Tls::new(lax.port("https")).ca(&pki.ca_cert()).version("-tls1_1").probe();
    assert!(p.established, "control: TLS 1.1 against a TLS 1.1-allowing Envoy failed:\n{}", p.output);
    assert_eq!(p.protocol, "TLSv1.1");
}

#[test]
fn plain_http_is_refused() {
    let (_pki, app, envoy) = start_sidecar();
    for listener in ["https", "mtls"] {
        let mut c = Client::new(envoy.port(listener));
        let r = c.try_request("GET", "/", &[], b"");
        assert!(r.is_err(), "plain HTTP on the {listener} listener got a response: {r:?}");
    }
    assert_eq!(app.hits(), 0);
    let errors: u64 = envoy.stats().iter().filter(|(k, _)| k.ends_with("ssl.connection_error")).map(|(_, v)| v).sum();
    assert_eq!(errors, 2, "one TLS connection error per plain-HTTP attempt");
}

#[test]
fn mtls_requires_a_client_cert_from_the_trusted_ca() {
    let (pki, app, envoy) = start_sidecar();
    let port = envoy.port("mtls");
    let base = Tls::new(port).ca(&pki.ca_cert());
    for flag in ["-tls1_2", "-tls1_3"] {
        let ok = base.clone().version(flag).client_cert(pki.client()).get("/");
        assert_eq!((ok.exit, ok.status), (0, 200), "trusted client cert over {flag}: {ok:?}");
        // The app learns who the client is from the verified certificate.
        let echoed: serde_json::Value = serde_json::from_str(&ok.body).unwrap();
        let xfcc = echoed["headers"]["x-forwarded-client-cert"].as_str().unwrap_or("");
        assert!(xfcc.contains("Subject=\"CN=client.meshpatterns.test\""), "x-forwarded-client-cert: {xfcc:?}");

        let none = base.clone().version(flag).get("/");
        assert_eq!(none.status, 0, "no client cert over {flag} got HTTP {}: {none:?}", none.status);
        assert_ne!(none.exit, 0);

        let rogue = base.clone().version(flag).client_cert(pki.rogue_client()).get("/");
        assert_eq!(rogue.status, 0, "rogue-CA client cert over {flag} got HTTP {}: {rogue:?}", rogue.status);
        assert_ne!(rogue.exit, 0);
    }
    assert_eq!(app.hits(), 2, "only the two trusted requests reach the app");
    let stats = envoy.stats();
    let sum = |suffix: &str| stats.iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v).sum::<u64>();
    assert_eq!(sum("ssl.fail_verify_no_cert"), 2, "no-cert refusals");
    assert_eq!(sum("ssl.fail_verify_error"), 2, "rogue-CA refusals");

    // A client cannot forge its identity header on the plain TLS listener either.
    let forged = Tls::new(envoy.port("https")).ca(&pki.ca_cert());
    let r = forged.get("/");
    let echoed: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(echoed["headers"].get("x-forwarded-client-cert").is_none());
}

#[test]
fn sni_selects_the_certificate_and_backend_per_hostname() {
    let pki = Pki::generate("sni");
    let shop = Upstream::start("shop");
    let api = Upstream::start("api");
    let envoy = EnvoyBuilder::new("tls-edge-sni.yaml")
        .var("CERT_DIR", pki.dir.display())
        .endpoints("SHOP", std::slice::from_ref(&shop))
        .endpoints("API", std::slice::from_ref(&api))
        .start();
    let port = envoy.port("edge");
    for (host, backend) in [(SNI_HOST_A, "shop"), (SNI_HOST_B, "api")] {
        for flag in ["-tls1_2", "-tls1_3"] {
            let client = Tls::new(port).sni(host).ca(&pki.ca_cert()).version(flag);
            let p = client.probe();
            assert!(p.established, "{host} {flag}:\n{}", p.output);
            assert_eq!(p.subject, format!("CN = {host}"), "certificate served for SNI {host}:\n{}", p.output);
            let r = client.get("/");
            assert_eq!((r.status, r.header("x-replica")), (200, Some(backend)), "{r:?}");
        }
    }
    // An unknown name gets the default (shop) certificate, which does not
    // verify for that name in curl.
    let p = Tls::new(port).sni("other.meshpatterns.test").ca(&pki.ca_cert()).probe();
    assert_eq!(p.subject, format!("CN = {SNI_HOST_A}"), "{}", p.output);
    let r = Tls::new(port).sni("other.meshpatterns.test").ca(&pki.ca_cert()).get("/");
    assert_eq!(r.status, 0, "curl must refuse a certificate for another name: {r:?}");
    assert_eq!((shop.hits(), api.hits()), (2, 2));
}
