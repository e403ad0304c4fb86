//! Checked parameters: the one idiom by which every component's settings are validated.
//!
//! A component's YAML settings deserialize into a `...Config` struct. Before anything runs,
//! the config goes through a `try_new` builder, which either returns parameters the running
//! thing can use or every problem, each naming the field it is about (so the pipeline loader
//! can point at its line and column). There are two shapes of `try_new`:
//!
//! - [`Checked::try_new`] for configs that the running thing uses as they are: the config
//!   implements [`Validate`], and a `Checked<C>` can only be had from `try_new`;
//! - `XParams::try_new` for operators that derive parameters of their own (node health,
//!   windows): their error enums convert into [`ParamErrors`] through [`FieldError`].
//!
//! ```
//! use edgeflow_operators::params::{Checked, ParamErrors, Validate};
//!
//! struct Rate { per_second: f64 }
//! impl Validate for Rate {
//!     fn validate(&self, problems: &mut ParamErrors) {
//!         if !(self.per_second > 0.0) {
//!             problems.at_value("per_second", "`per_second` must be positive");
//!         }
//!     }
//! }
//! assert!(Checked::try_new(Rate { per_second: 10.0 }).is_ok());
//! let errors = Checked::try_new(Rate { per_second: 0.0 }).err().unwrap();
//! assert_eq!(errors.problems()[0].field, "per_second");
//! ```

use std::fmt;
use std::ops::Deref;

/// Where in the YAML a problem is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// At the field's value (a value that cannot work).
    Value,
    /// At the field's key (a key that should not be there at all).
    Key,
    /// At the component's name (settings that do not fit together as a whole).
    Component,
}

/// One problem with a component's parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamProblem {
    /// The field it is about, as a dotted path within the component's settings (e.g.
    /// `dp.clip_norm`); empty for the component as a whole.
    pub field: String,
    /// Where to show it.
    pub place: Place,
    /// What is wrong (first line) and a hint (further lines).
    pub message: String,
}

/// Every problem with a component's parameters, in the order found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParamErrors(Vec<ParamProblem>);

impl ParamErrors {
    /// A problem with the value of `field`.
    pub fn at_value(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ParamProblem { field: field.into(), place: Place::Value, message: message.into() });
    }

    /// A problem with `field` being set at all.
    pub fn at_key(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ParamProblem { field: field.into(), place: Place::Key, message: message.into() });
    }

    /// A problem with the settings as a whole.
    pub fn whole(&mut self, message: impl Into<String>) {
        self.0.push(ParamProblem { field: String::new(), place: Place::Component, message: message.into() });
    }

    /// The problems found.
    pub fn problems(&self) -> &[ParamProblem] {
        &self.0
    }

    /// Whether none was found.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` if no problem was found.
    pub fn into_result<T>(self, value: T) -> Result<T, ParamErrors> {
        if self.0.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ParamErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            f.write_str(&problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParamErrors {}

/// A typed parameter error that knows the field it is about.
pub trait FieldError: fmt::Display {
    /// The field, as in the YAML.
    fn field(&self) -> &str;
}

impl<E: FieldError> From<E> for ParamErrors {
    fn from(err: E) -> Self {
        let mut errors = ParamErrors::default();
        errors.at_value(err.field(), err.to_string());
        errors
    }
}

/// Settings that can check themselves.
pub trait Validate {
    /// Adds every problem of the settings to `problems`.
    fn validate(&self, problems: &mut ParamErrors);
}

/// Settings that passed [`Validate`]: the only way to get one is [`Checked::try_new`], so a
/// running component holding one never meets a bad parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct Checked<C>(C);

impl<C: Validate> Checked<C> {
    /// Checks `config`, returning every problem.
    pub fn try_new(config: C) -> Result<Self, ParamErrors> {
        let mut problems = ParamErrors::default();
        config.validate(&mut problems);
        problems.into_result(Checked(config))
    }

    /// Like [`Checked::try_new`], with the problems `more` finds that need more than the
    /// config (files it names, how it is wired) added after the config's own.
    pub fn try_new_with(config: C, more: impl FnOnce(&C, &mut ParamErrors)) -> Result<Self, ParamErrors> {
        let mut problems = ParamErrors::default();
        config.validate(&mut problems);
        more(&config, &mut problems);
        problems.into_result(Checked(config))
    }
}

impl<C> Checked<C> {
    /// The checked settings.
    pub fn get(&self) -> &C {
        &self.0
    }
}

impl<C> Deref for Checked<C> {
    type Target = C;
    fn deref(&self) -> &C {
        &self.0
    }
}
