//! Substring search for short fixed needles. `str::find(&str)` builds a
//! Two-Way searcher on every call, which dominated parsing time; the needles
//! here are short literals, so a first-byte scan plus compare is faster and
//! still linear (at most needle-length work per haystack byte).
//! A match of a valid UTF-8 needle always starts on a char boundary.

pub trait FastStr {
    fn ffind(&self, pat: &str) -> Option<usize>;
    fn frfind(&self, pat: &str) -> Option<usize>;
    fn fcontains(&self, pat: &str) -> bool {
        self.ffind(pat).is_some()
    }
    fn fsplit_once(&self, pat: &str) -> Option<(&str, &str)>;
    fn frsplit_once(&self, pat: &str) -> Option<(&str, &str)>;
}

impl FastStr for str {
    fn ffind(&self, pat: &str) -> Option<usize> {
        let (h, p) = (self.as_bytes(), pat.as_bytes());
        if p.is_empty() {
            return Some(0);
        }
        if p.len() > h.len() {
            return None;
        }
        let last = h.len() - p.len();
        let mut i = 0;
        while i <= last {
            i += h[i..=last].iter().position(|&b| b == p[0])?;
            if &h[i..i + p.len()] == p {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    fn frfind(&self, pat: &str) -> Option<usize> {
        let (h, p) = (self.as_bytes(), pat.as_bytes());
        if p.is_empty() {
            return Some(h.len());
        }
        if p.len() > h.len() {
            return None;
        }
        let mut end = h.len() - p.len() + 1; // candidate starts are < end
        while end > 0 {
            let i = h[..end].iter().rposition(|&b| b == p[0])?;
            if &h[i..i + p.len()] == p {
                return Some(i);
            }
            end = i;
        }
        None
    }

    fn fsplit_once(&self, pat: &str) -> Option<(&str, &str)> {
        let i = self.ffind(pat)?;
        Some((&self[..i], &self[i + pat.len()..]))
    }

    fn frsplit_once(&self, pat: &str) -> Option<(&str, &str)> {
        let i = self.frfind(pat)?;
        Some((&self[..i], &self[i + pat.len()..]))
    }
}

#[cfg(test)]
mod tests {
    use super::FastStr;

    #[test]
    fn agrees_with_std() {
        let hay = "aaab::c::h::d ab ab (x) ééa::";
        for pat in [
            "::",
            "ab",
            " (",
            "é",
            "a::",
            "zz",
            "",
            "aaab::c::h::d ab ab (x) ééa::!",
        ] {
            assert_eq!(hay.ffind(pat), hay.find(pat), "{pat}");
            assert_eq!(hay.frfind(pat), hay.rfind(pat), "{pat}");
            assert_eq!(hay.fsplit_once(pat), hay.split_once(pat), "{pat}");
            assert_eq!(hay.frsplit_once(pat), hay.rsplit_once(pat), "{pat}");
        }
    }
}
