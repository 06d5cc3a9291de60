//! Registry credentials (environment, then the Docker config, then
//! anonymous; never printed) and extra TLS roots.

use oci_client::client::{Certificate, CertificateEncoding};
use oci_client::secrets::RegistryAuth;
use std::path::Path;

/// Credentials for `registry` (see the module header); never printed.
pub fn credentials(registry: &str) -> RegistryAuth {
    if let (Ok(u), Ok(p)) = (
        std::env::var("LLORCH_REGISTRY_USERNAME"),
        std::env::var("LLORCH_REGISTRY_PASSWORD"),
    ) {
        if !u.is_empty() {
            return RegistryAuth::Basic(u, p);
        }
    }
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => std::path::PathBuf::from(d).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(h) => std::path::PathBuf::from(h).join(".docker/config.json"),
            None => return RegistryAuth::Anonymous,
        },
    };
    docker_config_auth(&path, registry).unwrap_or(RegistryAuth::Anonymous)
}

/// `auths.<registry>.auth` (base64 of `user:password`) from a Docker config file.
pub fn docker_config_auth(path: &Path, registry: &str) -> Option<RegistryAuth> {
    use base64::Engine;
    let meta = fs_err::metadata(path).ok()?;
    if meta.len() > 1 << 20 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&fs_err::read(path).ok()?).ok()?;
    let entry = v["auths"]
        .get(registry)
        .or_else(|| v["auths"].get(format!("https://{registry}")))
        .or_else(|| v["auths"].get(format!("http://{registry}")))?;
    if let Some(t) = entry["identitytoken"].as_str().filter(|t| !t.is_empty()) {
        return Some(RegistryAuth::Bearer(t.to_string()));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some(RegistryAuth::Basic(u.to_string(), p.to_string()))
}

/// The PEM certificates of `SSL_CERT_FILE`, trusted on top of the built-in roots.
pub(super) fn extra_roots() -> Vec<Certificate> {
    let Some(path) = std::env::var_os("SSL_CERT_FILE") else {
        return Vec::new();
    };
    let Ok(text) = fs_err::read_to_string(path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(len) = rest[start..].find("-----END CERTIFICATE-----") else {
            break;
        };
        let end = start + len + "-----END CERTIFICATE-----".len();
        out.push(Certificate {
            encoding: CertificateEncoding::Pem,
            data: rest.as_bytes()[start..end].to_vec(),
        });
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        // base64("user:pa:ss")
        fs_err::write(
            &p,
            r#"{"auths": {"reg.example:5000": {"auth": "dXNlcjpwYTpzcw=="}, "tok.example": {"identitytoken": "T"}}}"#,
        )
        .unwrap();
        assert_eq!(
            docker_config_auth(&p, "reg.example:5000"),
            Some(RegistryAuth::Basic("user".into(), "pa:ss".into()))
        );
        assert_eq!(
            docker_config_auth(&p, "tok.example"),
            Some(RegistryAuth::Bearer("T".into()))
        );
        assert_eq!(docker_config_auth(&p, "other"), None);
        fs_err::write(&p, "not json").unwrap();
        assert_eq!(docker_config_auth(&p, "reg.example:5000"), None);
    }
}
