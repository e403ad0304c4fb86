//! `${VAR}` and `${VAR:-default}` substitution in YAML scalars.

/// A `${...}` reference that cannot be substituted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    /// `${` without its `}`.
    #[error("unterminated `${{` in `{0}`; write `${{VAR}}` or `${{VAR:-default}}`")]
    Unterminated(String),
    /// A reference that is not a variable name.
    #[error("`${{{0}}}` is not a valid environment variable reference")]
    Invalid(String),
    /// A variable that is not set, without a default.
    #[error("environment variable `{0}` is not set and has no default\nhint: set it, or write `${{{0}:-DEFAULT}}`")]
    Unset(String),
}

/// Replaces `${VAR}` and `${VAR:-default}` in `text` using `lookup`; `$$` is a literal `$`.
/// Returns the problem found (an unset variable without default, an unterminated reference).
pub fn substitute(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, EnvError> {
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
                return Err(EnvError::Unterminated(text.to_owned()));
            };
            let reference = &body[..close];
            let (name, default) = match reference.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (reference, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(EnvError::Invalid(reference.to_owned()));
            }
            match (lookup(name).filter(|value| !value.is_empty()), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(EnvError::Unset(name.to_owned())),
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
        assert!(substitute("${UNSET}", &env).unwrap_err().to_string().contains("`UNSET` is not set"));
        assert!(substitute("${OPEN", &env).unwrap_err().to_string().contains("unterminated"));
    }
}
