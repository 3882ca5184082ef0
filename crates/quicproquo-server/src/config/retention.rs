//! The retention job's settings (ADR 0016): how long acknowledged log entries are kept, the
//! hard maximum age of anything in a log or an inbox, how often the job runs and how much it
//! deletes per transaction.

use std::time::Duration;

use super::{ConfigError, FileConfig, duration, invalid};
use crate::ordering::retention::RetentionSettings;
use crate::store::retention::RetentionPolicy;

/// Default `log_retention`.
const DEFAULT_LOG_RETENTION: Duration = Duration::from_secs(30 * 86_400);
/// Default `log_max_age`.
const DEFAULT_LOG_MAX_AGE: Duration = Duration::from_secs(365 * 86_400);
/// Default `retention_interval`.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
/// Default `retention_batch`.
const DEFAULT_BATCH: usize = 1000;
/// Largest accepted `retention_batch`.
const MAX_BATCH: usize = 100_000;

/// The defaults.
pub(super) fn default_settings() -> RetentionSettings {
    RetentionSettings {
        policy: RetentionPolicy {
            log_retention: DEFAULT_LOG_RETENTION,
            log_max_age: DEFAULT_LOG_MAX_AGE,
            batch: DEFAULT_BATCH,
        },
        interval: DEFAULT_INTERVAL,
    }
}

/// The retention flags and `QPQ_*` variables (flattened into the server's overrides).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RetentionOverrides {
    /// Keep group log entries every member has acknowledged this long, e.g. `30d`; `0s`
    /// deletes them as soon as the job runs [default: 30d].
    #[arg(long, env = "QPQ_LOG_RETENTION")]
    pub log_retention: Option<String>,
    /// Delete log entries and Welcomes older than this whoever has read them; a member that
    /// falls further behind gets history_gone [default: 365d].
    #[arg(long, env = "QPQ_LOG_MAX_AGE")]
    pub log_max_age: Option<String>,
    /// Time between two passes of the retention job, e.g. `10m` [default: 10m].
    #[arg(long, env = "QPQ_RETENTION_INTERVAL")]
    pub retention_interval: Option<String>,
    /// Most rows the retention job deletes in one transaction [default: 1000].
    #[arg(long, env = "QPQ_RETENTION_BATCH")]
    pub retention_batch: Option<usize>,
}

/// The settings from the flags/environment over the file over `defaults`.
pub(super) fn resolve(
    file: &mut FileConfig,
    overrides: &mut RetentionOverrides,
    defaults: RetentionSettings,
) -> Result<RetentionSettings, ConfigError> {
    Ok(RetentionSettings {
        policy: RetentionPolicy {
            log_retention: duration(
                "log_retention",
                overrides.log_retention.take().or(file.log_retention.take()),
                defaults.policy.log_retention,
            )?,
            log_max_age: duration(
                "log_max_age",
                overrides.log_max_age.take().or(file.log_max_age.take()),
                defaults.policy.log_max_age,
            )?,
            batch: overrides
                .retention_batch
                .or(file.retention_batch)
                .unwrap_or(defaults.policy.batch),
        },
        interval: duration(
            "retention_interval",
            overrides
                .retention_interval
                .take()
                .or(file.retention_interval.take()),
            defaults.interval,
        )?,
    })
}

/// Checks the settings' ranges.
pub(super) fn validate(s: &RetentionSettings) -> Result<(), ConfigError> {
    if s.policy.log_max_age < Duration::from_secs(1) {
        return Err(invalid("log_max_age", "must be at least 1s"));
    }
    if s.policy.log_retention > s.policy.log_max_age {
        return Err(invalid(
            "log_retention",
            "must not exceed log_max_age (which deletes everything older anyway)",
        ));
    }
    if s.interval < Duration::from_millis(100) || s.interval > Duration::from_secs(86_400) {
        return Err(invalid(
            "retention_interval",
            "must be between 100ms and 24h",
        ));
    }
    if !(1..=MAX_BATCH).contains(&s.policy.batch) {
        return Err(invalid(
            "retention_batch",
            format!("must be between 1 and {MAX_BATCH}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid_and_bad_values_are_refused() {
        let ok = default_settings();
        assert!(validate(&ok).is_ok());
        let mut s = ok;
        s.policy.log_retention = s.policy.log_max_age + Duration::from_secs(1);
        assert!(validate(&s).is_err());
        let mut s = ok;
        s.policy.batch = 0;
        assert!(validate(&s).is_err());
        let mut s = ok;
        s.interval = Duration::from_millis(10);
        assert!(validate(&s).is_err());
        let mut s = ok;
        s.policy.log_retention = Duration::ZERO;
        assert!(validate(&s).is_ok());
    }

    #[test]
    fn the_file_and_the_flags_set_every_setting() -> Result<(), ConfigError> {
        let mut file = FileConfig {
            log_retention: Some("7d".into()),
            log_max_age: Some("90d".into()),
            retention_batch: Some(50),
            ..FileConfig::default()
        };
        let mut flags = RetentionOverrides {
            retention_interval: Some("1m".into()),
            log_max_age: Some("60d".into()),
            ..RetentionOverrides::default()
        };
        let s = resolve(&mut file, &mut flags, default_settings())?;
        assert_eq!(s.policy.log_retention, Duration::from_secs(7 * 86_400));
        assert_eq!(s.policy.log_max_age, Duration::from_secs(60 * 86_400));
        assert_eq!(s.policy.batch, 50);
        assert_eq!(s.interval, Duration::from_secs(60));
        Ok(())
    }
}
