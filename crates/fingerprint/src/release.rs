//! Release ordering: `v1.10.0` is newer than `v1.9.0`. A release that
//! parses as a semantic version (after an optional `package@` prefix and
//! `v`) gets a key that sorts as the versions do; others get none and are
//! ordered by when they were first seen (in SQL, tb_release).

/// A text key that sorts as semantic versions do (None: not one).
/// `1.2` is `1.2.0`; a pre-release sorts before its release (`1.0.0-rc.1` <
/// `1.0.0`), its dot-separated parts numerically where numeric; build
/// metadata (`+abc`) is ignored.
pub fn release_key(release: &str) -> Option<String> {
    let r = release.trim();
    let r = r.rsplit_once('@').map_or(r, |(_, v)| v);
    let r = r.strip_prefix(['v', 'V']).unwrap_or(r);
    let r = r.split_once('+').map_or(r, |(v, _)| v);
    let (core, pre) = match r.split_once('-') {
        Some((c, p)) if !p.is_empty() => (c, Some(p)),
        Some(_) => return None,
        None => (r, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    if parts.len() < 2 || parts.len() > 4 {
        return None;
    }
    let mut key = String::with_capacity(64);
    for i in 0..4 {
        let p = parts.get(i).copied().unwrap_or("0");
        if p.is_empty() || p.len() > 18 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let n: u64 = p.parse().ok()?;
        key.push_str(&format!("{n:018}."));
    }
    match pre {
        // a release sorts after all its pre-releases: '~' is above any
        // character a pre-release part is written with
        None => key.push('~'),
        Some(pre) => {
            key.push('-');
            for id in pre.split('.') {
                if id.is_empty() || !id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
                    return None;
                }
                // numeric identifiers below alphanumeric ones, by value
                if id.bytes().all(|c| c.is_ascii_digit()) && id.len() <= 18 {
                    key.push_str(&format!("0{:018}.", id.parse::<u64>().ok()?));
                } else {
                    key.push('1');
                    key.push_str(id);
                    key.push('.');
                }
            }
        }
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::release_key;

    #[test]
    fn versions_sort_as_versions() {
        let ordered = [
            "0.9.0",
            "v1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "shop@1.0.1",
            "1.2",
            "v1.9.0",
            "1.9.1+build.7",
            "v1.10.0",
            "2.0.0.1",
            "10.0.0",
        ];
        let keys: Vec<String> = ordered.iter().map(|r| release_key(r).expect(r)).collect();
        for w in keys.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        assert_eq!(release_key("v1.2.0"), release_key("shop@1.2"));
        assert_eq!(release_key("1.2.0+a"), release_key("1.2.0+b"));
    }

    #[test]
    fn other_releases_have_no_key() {
        for r in ["", "abc123", "2026-12-01", "1..2", "1.2.3-", "release-7", "1.2.3.4.5", "v", "1.x"] {
            assert_eq!(release_key(r), None, "{r}");
        }
    }
}
