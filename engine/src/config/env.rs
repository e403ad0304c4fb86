//! `${VAR}` and `${VAR:-default}` substitution in YAML scalars.

/// Replaces `${VAR}` and `${VAR:-default}` in `text` using `lookup`; `$$` is a literal `$`.
/// Returns the problems found (unset variables without default, unterminated references).
pub fn substitute(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let Some(close) = body.find('}') else {
                return Err(format!("unterminated `${{` in `{text}`; write `${{VAR}}` or `${{VAR:-default}}`"));
            };
            let reference = &body[..close];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{reference}}}` is not a valid environment variable reference"));
            }
            match (lookup(name).filter(|value| !value.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => {
                    return Err(format!(
                        "environment variable `{name}` is not set and has no default\nhint: set it, or write `${{{name}:-DEFAULT}}`"
                    ))
                }
            }
            rest = &body[close + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "SET").then(|| "value".to_owned())
    }

    #[test]
    fn substitutes_with_defaults() {
        assert_eq!(substitute("a ${SET} b", &env).unwrap(), "a value b");
        assert_eq!(substitute("${UNSET:-9092}", &env).unwrap(), "9092");
        assert_eq!(substitute("${SET:-x}", &env).unwrap(), "value");
        assert_eq!(substitute("cost $$5", &env).unwrap(), "cost $5");
        assert!(substitute("${UNSET}", &env).unwrap_err().contains("`UNSET` is not set"));
        assert!(substitute("${OPEN", &env).unwrap_err().contains("unterminated"));
    }
}
