//! The approved client tool a call comes from. Where mutual TLS is on, rustls has already
//! checked that the client's certificate chains to the configured client CA; issuing a tool a
//! certificate is what approves it, and the certificate's subject CN names it (`dbeaver`,
//! `adbc-python`). The name goes into every audit record of the call.

/// The tool named by the subject CN of a client certificate (DER), if it names one. Only
/// printable names of at most 64 characters are taken, so the audit log records no odd bytes.
pub fn name_from_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.trim();
    let printable = cn.chars().all(|c| c.is_ascii_graphic() || c == ' ');
    (!cn.is_empty() && cn.len() <= 64 && printable).then(|| cn.to_owned())
}

/// The outcome of client-certificate identification for one request, set by the transport
/// layer in the request's extensions next to [`super::Authenticated`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTool(pub Option<String>);

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

    use super::*;

    fn cert(cn: Option<&str>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Essex County Council");
        if let Some(cn) = cn {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_subject_cn_names_the_tool() {
        assert_eq!(name_from_der(&cert(Some("dbeaver"))).as_deref(), Some("dbeaver"));
        assert_eq!(name_from_der(&cert(None)), None);
        assert_eq!(name_from_der(&cert(Some("bad\u{7}name"))), None);
        assert_eq!(name_from_der(&cert(Some(&"x".repeat(65)))), None);
        assert_eq!(name_from_der(b"not a certificate"), None);
    }
}
