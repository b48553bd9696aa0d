//! Stand-ins for the backends whose cargo feature is off: the same names
//! and constructors, every call a typed `Unavailable` error naming the
//! feature (see [`crate::backend`]).
//!
//! They are compiled for unit tests too, whatever the features, so one
//! test build (`--all-features`, as CI's) checks them without building a
//! second dependency graph; `clippy --no-default-features` checks that
//! [`crate::backend::connect`] picks them when a feature is off.

// Beside a compiled-in backend (tests only), a stub is not re-exported.
#[cfg(any(test, not(feature = "containerd")))]
#[cfg_attr(feature = "containerd", allow(unreachable_pub))]
pub(crate) mod containerd;
#[cfg(any(test, not(feature = "youki")))]
#[cfg_attr(feature = "youki", allow(unreachable_pub))]
pub(crate) mod youki;

#[cfg(test)]
mod tests {
    use crate::{ContainerdConfig, Runtime, RuntimeErrorKind};

    fn says_compiled_out(err: crate::RuntimeError, feature: &str) {
        assert_eq!(err.kind(), RuntimeErrorKind::Unavailable);
        assert!(err.to_string().contains(&format!("`{feature}` cargo feature")), "{err}");
    }

    #[tokio::test]
    async fn a_backend_compiled_out_is_a_typed_unavailable_error() {
        let youki = super::youki::YoukiRuntime::new("/nonexistent/vessel-stub-test");
        assert_eq!(youki.name(), "youki");
        says_compiled_out(youki.is_available().unwrap_err(), "youki");
        let config = ContainerdConfig {
            address: "/nonexistent/containerd.sock".into(),
            namespace: "vessel".into(),
            root: "/nonexistent/vessel-stub-test".into(),
        };
        says_compiled_out(super::containerd::ContainerdRuntime::connect(config).await.unwrap_err(), "containerd");
    }
}
