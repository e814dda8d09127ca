//! What a notification rule's condition (a jsonpath over the error's
//! payload) may be. The fold tests a condition on every occurrence a rule
//! looks at, so its cost is paid per capture; a few constructs make that
//! cost grow as a power of the payload's size (a filter that walks the
//! whole payload again from its root, recursive wildcards inside each
//! other) and let one role that may write rules hold every count and alert
//! of the database. They are refused when the rule is written; the fold
//! also gives rules a deadline (`_fraiseql_rules_deadline`).

use pgrx::prelude::*;

/// The longest condition accepted, in characters of its canonical text.
const MAX_LEN: usize = 2000;
/// Filters (`? (...)`) inside one another.
const MAX_FILTER_DEPTH: usize = 3;

/// Why a condition (jsonpath's canonical text, as PostgreSQL prints it) is
/// refused, or None.
pub fn problem(text: &str) -> Option<String> {
    if text.chars().count() > MAX_LEN {
        return Some(format!("the condition is longer than {MAX_LEN} characters"));
    }
    let chars: Vec<char> = text.chars().collect();
    // the parentheses open now, and whether each opened a filter
    let mut open: Vec<bool> = Vec::new();
    let mut recursive = 0;
    // accessors that give many values ([*], .*, **): two of them compared
    // are a cross product, more multiply further
    let mut wildcards = 0;
    // inside a subscript [...]: a list ([0,0,0], which in lax mode repeats
    // the item once per entry, and chained multiplies) or a range ([0 to
    // 1000000000], walked whole) is refused
    let mut in_subscript = false;
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '"' => {
                // a string literal or a quoted key: skipped whole
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
            }
            '*' if chars.get(i + 1) == Some(&'*') => {
                recursive += 1;
                wildcards += 1;
                if recursive > 1 {
                    return Some("the condition has more than one recursive wildcard (**)".into());
                }
                i += 1;
            }
            '*' if in_subscript || (i > 0 && chars[i - 1] == '.') => wildcards += 1,
            '[' => in_subscript = true,
            ']' => in_subscript = false,
            ',' if in_subscript => {
                return Some("a subscript in the condition lists several items ([a, b]): use one, or [*]".into());
            }
            't' if in_subscript
                && chars.get(i + 1) == Some(&'o')
                && i > 0
                && chars[i - 1].is_whitespace() =>
            {
                return Some("a subscript in the condition is a range ([a to b]): use one item, or [*]".into());
            }
            '?' => {
                let mut j = i + 1;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                if chars.get(j) == Some(&'(') {
                    open.push(true);
                    if open.iter().filter(|f| **f).count() > MAX_FILTER_DEPTH {
                        return Some(format!(
                            "the condition nests filters more than {MAX_FILTER_DEPTH} deep"
                        ));
                    }
                    i = j;
                }
            }
            '(' => open.push(false),
            ')' => {
                open.pop();
            }
            '$' if open.iter().any(|f| *f) => {
                return Some(
                    "a filter in the condition reads from the root ($): use @, the item it filters".into(),
                );
            }
            _ => {}
        }
        i += 1;
        if wildcards > 2 {
            return Some("the condition has more than two wildcards ([*], .*, **)".into());
        }
    }
    None
}

/// The problem with a rule's condition, for the rule table's check trigger.
#[pg_extern(immutable, strict, parallel_safe)]
fn _fraiseql_condition_problem(condition: &str) -> Option<String> {
    problem(condition)
}

thread_local! {
    /// The rules budget of the fold being run: when it ends, and whether
    /// the rules are being retried one by one (see _fraiseql_rules_budget).
    static BUDGET: std::cell::Cell<(Option<std::time::Instant>, bool)> = const { std::cell::Cell::new((None, false)) };
}

fn in_worker() -> bool {
    unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BG_WORKER }
}

fn rules_timeout() -> std::time::Duration {
    std::time::Duration::from_millis(crate::guc::RULES_TIMEOUT_MS.get().max(100) as u64)
}

/// The time one kind of notification rules (milestones, the others) may
/// take in a fold, in the worker: `fraiseql_obs.rules_timeout` for
/// evaluating them all together (`start` opens it), and, if that fails,
/// once more for retrying them one by one, each with a quarter of it (the
/// first call with `start` false opens that second budget; every such call
/// says whether a whole quarter of it is left). So a fold spends at most
/// four times rules_timeout on rules, however many are slow; those not
/// reached are skipped for that fold, and those that ran past their quarter
/// are suspended (tb_notification_rule_strike). Outside the worker there is
/// no budget (always some left).
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_rules_budget(start: bool) -> bool {
    if !in_worker() {
        return true;
    }
    let now = std::time::Instant::now();
    let (end, retrying) = BUDGET.with(|b| b.get());
    if start {
        BUDGET.with(|b| b.set((Some(now + rules_timeout()), false)));
        return true;
    }
    if !retrying {
        BUDGET.with(|b| b.set((Some(now + rules_timeout()), true)));
        return true;
    }
    // a rule runs alone only with its whole quarter ahead: one cancelled
    // sooner would be struck for the others' time
    end.is_none_or(|end| end.saturating_duration_since(now) >= rules_timeout() / 4)
}

/// Arms (`arm`) or disarms a deadline, at the end of what is left of the
/// fold's rules budget, for what the worker is running now, as
/// statement_timeout would, so that rules that would run for long are
/// cancelled and skipped instead of holding every count. (PostgreSQL checks
/// for the cancel between rows and inside a regular expression, not inside
/// one jsonpath evaluation otherwise: the shapes checked above bound
/// that.) In a background worker only: a client session's statement loop
/// owns its statement_timeout, and a timer left armed there could cancel a
/// later statement. Says whether it acted.
#[pg_extern(volatile, parallel_unsafe)]
fn _fraiseql_rules_deadline(arm: bool) -> bool {
    if !in_worker() {
        return false;
    }
    if arm {
        let full = rules_timeout();
        let (end, retrying) = BUDGET.with(|b| b.get());
        let mut left = end.map_or(full, |end| end.saturating_duration_since(std::time::Instant::now()));
        if retrying {
            left = left.min(full / 4);
        }
        crate::timeout::arm_statement_timeout((left.as_millis() as i32).max(1));
    } else {
        crate::timeout::disarm_statement_timeout();
    }
    true
}

#[cfg(test)]
mod unit {
    use super::problem;

    #[test]
    fn ordinary_conditions_pass() {
        for c in [
            r#"($."context"."user_id" == "vip3")"#,
            r#"($."severity" == "critical" && $."context"."amount" > 100)"#,
            r#"($."error_message" like_regex "time(out|d out)" flag "i")"#,
            r#"exists ($."context"."items"[*]?(@."price" > 1000 && @."qty" >= 2))"#,
            r#"exists ($."**"?(@ == "x"))"#,
            r#"exists ($.**?(@ == "x"))"#,
            r#"($."a" == "?($)")"#,
        ] {
            assert_eq!(problem(c), None, "{c}");
        }
    }

    #[test]
    fn costly_shapes_are_refused() {
        let nested = r#"exists ($.**?(exists ($.**?(@ == "no")))))"#;
        assert!(problem(nested).is_some());
        assert!(problem(r#"exists ($.**?(exists (@.**?(@ == "no"))))"#).unwrap().contains("recursive"));
        assert!(problem(r#"exists ($."a"[*]?(exists ($."a"[*]))))"#).unwrap().contains("root"));
        let deep = r#"exists ($."a"?(exists (@."b"?(exists (@."c"?(exists (@."d"?(@ == 1))))))))"#;
        assert!(problem(deep).unwrap().contains("deep"));
        assert!(problem(&format!(r#"($."a" == "{}")"#, "x".repeat(3000))).unwrap().contains("longer"));
        let lists = format!(r#"exists ($[0,0,0,0,0,0,0,0,0,0]{}."nope")"#, "[0,0,0,0,0,0,0,0,0,0]".repeat(11));
        assert!(problem(&lists).unwrap().contains("several"));
        assert!(problem(r#"exists ($."a"[0 to 1000000000])"#).unwrap().contains("range"));
        assert!(problem(r#"($."a"[*].* == $."b"[*])"#).unwrap().contains("wildcards"));
        // one subscript, last, strings with brackets and commas: fine
        assert_eq!(problem(r#"($."a"[0] == "x[1, 2 to 3]" && $."b"[last] == 1)"#), None);
        assert_eq!(problem(r#"($."a"[*] == $."b"[*])"#), None);
    }
}
