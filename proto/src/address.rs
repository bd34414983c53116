//! The coordinator's address as users write it, and what a failed call to it means: one place
//! that both the CLI and the agent use, so both accept `host:port` and both tell a server that
//! is not a Kiln coordinator apart from one that cannot be reached.

/// The default coordinator address.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// The URL to dial for a coordinator address: `host:port` gets `http://` in front; `http://`
/// and `https://` URLs are taken as they are. An empty address, another scheme, or a path
/// after the port is refused with the form expected.
pub fn coordinator_url(address: &str) -> Result<String, String> {
    let address = address.trim();
    if address.is_empty() {
        return Err(format!(
            "the coordinator address is empty (expected host:port or http://host:port, e.g. {DEFAULT_COORDINATOR})"
        ));
    }
    let url = match address.split_once("://") {
        Some(("http" | "https", _)) => address.to_string(),
        Some((scheme, _)) => {
            return Err(format!(
                "the coordinator address {address:?} has scheme {scheme:?}; use http:// or https:// (or plain host:port)"
            ))
        }
        None => format!("http://{address}"),
    };
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
    let host_port = rest.trim_end_matches('/');
    if host_port.is_empty() {
        return Err(format!(
            "the coordinator address {address:?} names no host (expected host:port, e.g. 127.0.0.1:7070)"
        ));
    }
    if host_port.contains('/') {
        return Err(format!(
            "the coordinator address {address:?} has a path; give only host:port (e.g. {DEFAULT_COORDINATOR})"
        ));
    }
    Ok(format!(
        "{}://{host_port}",
        &url[..url.find("://").unwrap_or(0)]
    ))
}

/// Whether a failed call means the server at the address answered but is not a Kiln
/// coordinator (plain HTTP, another gRPC service, a proxy's error page) — a configuration
/// mistake that retrying does not mend — and if so, what to tell the user.
pub fn not_a_coordinator(status: &tonic::Status) -> Option<String> {
    if status.code() == tonic::Code::Unimplemented {
        return Some(not_a_coordinator_because(
            "a gRPC server without Kiln's services",
            status.message(),
        ));
    }
    not_a_coordinator_error(status.message())
}

/// The same for the text of a transport error (its whole source chain): `Some` when it shows
/// that the peer speaks something other than gRPC over HTTP/2.
pub fn not_a_coordinator_error(msg: &str) -> Option<String> {
    let what = if let Some(http) = msg
        .split("HTTP status code ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
    {
        format!("an HTTP server that answered status {http} instead of gRPC")
    } else if msg.contains("h2 protocol error") || msg.contains("http2 error") {
        "a server that does not speak HTTP/2 gRPC (plain HTTP/1?)".to_string()
    } else if msg.contains("grpc-status header missing") {
        "a server that does not answer with gRPC".to_string()
    } else {
        return None;
    };
    Some(not_a_coordinator_because(&what, msg))
}

fn not_a_coordinator_because(what: &str, msg: &str) -> String {
    format!(
        "the address answered, but it is not a Kiln coordinator: {what} ({msg}). Check --coordinator / KILN_COORDINATOR: it must point at `kiln coordinator`'s --listen address"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_gets_http_and_urls_stay() {
        assert_eq!(
            coordinator_url("localhost:7070").unwrap(),
            "http://localhost:7070"
        );
        assert_eq!(
            coordinator_url(" 10.0.0.1:7070/ ").unwrap(),
            "http://10.0.0.1:7070"
        );
        assert_eq!(coordinator_url("http://h:1").unwrap(), "http://h:1");
        assert_eq!(coordinator_url("https://h:1").unwrap(), "https://h:1");
        assert!(coordinator_url("").unwrap_err().contains("empty"));
        assert!(coordinator_url("grpc://h:1")
            .unwrap_err()
            .contains("http://"));
        assert!(coordinator_url("http://").unwrap_err().contains("no host"));
        assert!(coordinator_url("h:1/kiln").unwrap_err().contains("path"));
    }

    #[test]
    fn statuses_of_servers_that_are_not_coordinators_are_named() {
        let http404 =
            tonic::Status::unknown("grpc-status header missing, mapped from HTTP status code 404");
        assert!(not_a_coordinator(&http404).unwrap().contains("status 404"));
        let h1 = tonic::Status::unknown("h2 protocol error: http2 error");
        assert!(not_a_coordinator(&h1).unwrap().contains("HTTP/2"));
        assert!(not_a_coordinator(&tonic::Status::unimplemented("")).is_some());
        assert!(not_a_coordinator(&tonic::Status::not_found("job 7")).is_none());
        assert!(not_a_coordinator(&tonic::Status::unavailable("down")).is_none());
    }
}
