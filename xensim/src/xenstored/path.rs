//! Path syntax: canonicalisation and validation as cxenstored 4.17 does them.

use xen::abi::xs_wire::XENSTORE_ABS_PATH_MAX;

use super::error::XsError;

const DOMAIN_PREFIX: &str = "/local/domain/";

/// `/local/domain/<domid>`: the home of a domain and the base of its relative paths.
pub fn domain_path(domid: u32) -> String {
    format!("{DOMAIN_PREFIX}{domid}")
}

/// Makes `path` absolute for a connection of `domid`: paths starting with `/` or `@`
/// are kept, anything else is taken relative to the domain's home.
pub(crate) fn canonicalize(domid: u32, path: &str) -> String {
    if path.starts_with('/') || path.starts_with('@') {
        path.to_owned()
    } else {
        format!("{}/{path}", domain_path(domid))
    }
}

/// The offset after `/local/domain/<up to 5 digits>/`, as `sscanf("%5u/%n")` finds it.
fn local_offset(path: &str) -> usize {
    let Some(rest) = path.strip_prefix(DOMAIN_PREFIX) else {
        return 0;
    };
    let digits = rest.bytes().take(5).take_while(u8::is_ascii_digit).count();
    if digits > 0 && rest.as_bytes().get(digits) == Some(&b'/') {
        DOMAIN_PREFIX.len() + digits + 1
    } else {
        0
    }
}

fn valid_chars(path: &str) -> bool {
    path.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'@'))
}

/// `is_valid_nodename()`: absolute, no trailing or double `/`, at most
/// `XENSTORE_ABS_PATH_MAX` bytes, at most `rel_max` bytes after a `/local/domain/<id>/`
/// prefix (or in total without one), and only `[A-Za-z0-9-/_@]`.
pub(crate) fn is_valid_nodename(path: &str, rel_max: usize) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    if path.ends_with('/') && path != "/" {
        return false;
    }
    if path.contains("//") {
        return false;
    }
    if path.len() > XENSTORE_ABS_PATH_MAX {
        return false;
    }
    if path.len() > local_offset(path) + rel_max {
        return false;
    }
    valid_chars(path)
}

/// Decodes, canonicalises and validates a node path from a request.
pub(crate) fn node_path(domid: u32, raw: &[u8], rel_max: usize) -> Result<String, XsError> {
    let s = std::str::from_utf8(raw).map_err(|_| XsError::Inval)?;
    let p = canonicalize(domid, s);
    if is_valid_nodename(&p, rel_max) {
        Ok(p)
    } else {
        Err(XsError::Inval)
    }
}

/// The parent of an absolute path (`/` is its own parent).
pub(crate) fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

/// The last component of an absolute path.
pub(crate) fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `parent/name`, without doubling the `/` of the root.
pub(crate) fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether `child` is `parent` or below it (everything is below `/`).
pub(crate) fn is_child(child: &str, parent: &str) -> bool {
    if parent == "/" {
        return true;
    }
    match child.strip_prefix(parent) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_is_valid_nodename_rejects_bad_syntax() {
        for bad in [
            "",
            "a",
            "/a/",
            "/local/domain/",
            "//a",
            "/a//b",
            "/a b",
            "/a.b",
            "/a\u{e9}",
        ] {
            assert!(!is_valid_nodename(bad, 2048), "{bad:?}");
        }
        for good in ["/", "/a", "/a-b_c@d/0"] {
            assert!(is_valid_nodename(good, 2048), "{good:?}");
        }
    }

    #[test]
    fn test_is_valid_nodename_relative_limit_counts_after_domain_prefix() {
        let ok = format!("/local/domain/5/{}", "a".repeat(2048));
        let bad = format!("/local/domain/5/{}", "a".repeat(2049));
        assert!(is_valid_nodename(&ok, 2048));
        assert!(!is_valid_nodename(&bad, 2048));
        assert!(!is_valid_nodename(&format!("/{}", "a".repeat(2048)), 2048));
    }

    #[test]
    fn test_path_helpers_root_and_nested() {
        assert_eq!(parent("/a"), "/");
        assert_eq!(parent("/a/b"), "/a");
        assert_eq!(basename("/a/b"), "b");
        assert_eq!(child_path("/", "a"), "/a");
        assert!(is_child("/a/b", "/a"));
        assert!(is_child("/a", "/a"));
        assert!(!is_child("/ab", "/a"));
        assert_eq!(canonicalize(7, "device"), "/local/domain/7/device");
    }
}
