//! How a worker's cloud host is launched: the launch parts of a worker template (EC2
//! launch template, IAM instance profile, key pair, user data, root volume, market), their
//! start-up validation, and the capacity fallback plan (which instance type and market to
//! try next when the cloud has no capacity). Pure data and pure functions only.

use serde::{Deserialize, Serialize};

use crate::domain::worker::WorkerTemplate;

/// The launch template version used when a template names none.
pub const DEFAULT_LAUNCH_TEMPLATE_VERSION: &str = "$Default";

/// The root device name used when `root_volume` names none (Amazon Linux and most
/// current AMIs).
pub const DEFAULT_ROOT_DEVICE: &str = "/dev/xvda";

/// EBS volume types EC2 accepts for a root volume.
pub const VOLUME_TYPES: &[&str] = &["gp2", "gp3", "io1", "io2", "st1", "sc1", "standard"];

/// An EC2 launch template, by id or by name (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LaunchTemplateRef {
    /// Launch template id (`lt-...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Launch template name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Version number, `$Latest` or `$Default`; `None` means `$Default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl LaunchTemplateRef {
    /// The version to launch (`$Default` when none is named).
    pub fn version_or_default(&self) -> &str {
        self.version
            .as_deref()
            .unwrap_or(DEFAULT_LAUNCH_TEMPLATE_VERSION)
    }
}

/// The IAM instance profile the host runs as, by ARN or by name (exactly one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct IamInstanceProfile {
    /// Instance profile ARN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arn: Option<String>,
    /// Instance profile name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The root EBS volume of the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootVolume {
    /// Size in GiB (positive). Signed so a negative value is refused by validation with
    /// the template named, not by the YAML parser.
    pub size_gib: i64,
    /// EBS volume type (`gp3`, `gp2`, `io1`, `io2`, `st1`, `sc1`, `standard`).
    #[serde(rename = "type")]
    pub volume_type: String,
    /// Root device name of the AMI.
    #[serde(default = "default_root_device")]
    pub device_name: String,
}

fn default_root_device() -> String {
    DEFAULT_ROOT_DEVICE.to_owned()
}

/// Which EC2 market a launch buys from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Market {
    /// Regular on-demand capacity.
    #[default]
    OnDemand,
    /// Spot capacity (cheaper, may be reclaimed).
    Spot,
}

impl Market {
    /// The configuration spelling (`on_demand`, `spot`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Market::OnDemand => "on_demand",
            Market::Spot => "spot",
        }
    }
}

/// One launch try: an instance type (`None` when the EC2 launch template supplies it)
/// in one market.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchAttempt {
    /// Instance type asked for.
    pub instance_type: Option<String>,
    /// Market asked for.
    pub market: Market,
}

impl std::fmt::Display for LaunchAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self
            .instance_type
            .as_deref()
            .unwrap_or("launch-template type");
        write!(f, "{t} ({})", self.market.as_str())
    }
}

/// A failed try and the one made next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LaunchFallback {
    /// The try that failed.
    pub failed: LaunchAttempt,
    /// The cloud's error code for it (e.g. `InsufficientInstanceCapacity`).
    pub code: String,
    /// The try made next.
    pub next: LaunchAttempt,
}

impl std::fmt::Display for LaunchFallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} answered {}; trying {}",
            self.failed, self.code, self.next
        )
    }
}

/// What a failed launch means for the next try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaunchFailure {
    /// No capacity for this instance type here now: another type may have some.
    Capacity,
    /// The spot market refuses (price, account spot limit): on-demand may work.
    Spot,
    /// Anything else: no other try is made.
    Other,
}

/// EC2 error codes that mean "no capacity of this instance type right now"
/// (`UnfulfillableCapacity` is the spot market's way of saying it).
pub const CAPACITY_CODES: &[&str] = &["InsufficientInstanceCapacity", "UnfulfillableCapacity"];

/// EC2 error codes that only the spot market gives: on-demand may still launch.
pub const SPOT_CODES: &[&str] = &["SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded"];

/// Classifies the cloud's error code of a failed launch (`None`: no code, e.g. a
/// transport failure).
pub fn classify_launch_error(code: Option<&str>) -> LaunchFailure {
    match code {
        Some(c) if CAPACITY_CODES.contains(&c) => LaunchFailure::Capacity,
        Some(c) if SPOT_CODES.contains(&c) => LaunchFailure::Spot,
        _ => LaunchFailure::Other,
    }
}

/// The instance types of a template in the order they are tried: `instance_types`, or
/// `instance_type` as a one-element list, or none (the launch template supplies it).
pub fn instance_types(t: &WorkerTemplate) -> Vec<String> {
    match (&t.instance_types, &t.instance_type) {
        (Some(list), _) => list.clone(),
        (None, Some(one)) => vec![one.clone()],
        (None, None) => Vec::new(),
    }
}

/// The first try of a launch: the primary instance type in the template's market.
pub fn first_attempt(t: &WorkerTemplate) -> LaunchAttempt {
    LaunchAttempt {
        instance_type: instance_types(t).into_iter().next(),
        market: t.market,
    }
}

/// The try after `failed` failed with `failure`, or `None` to give up:
/// - a capacity error moves to the next instance type in the same market; a spot launch
///   that has run out of types goes on on-demand from the first type (when
///   `spot_fallback_on_demand`);
/// - a spot-only error goes on on-demand from the first type (when
///   `spot_fallback_on_demand`), since no other spot type would help;
/// - any other error ends the launch.
///
/// Each (type, market) pair is tried at most once, so a launch makes at most twice as
/// many tries as the template has types.
pub fn next_attempt(
    t: &WorkerTemplate,
    failed: &LaunchAttempt,
    failure: LaunchFailure,
) -> Option<LaunchAttempt> {
    let types = instance_types(t);
    let on_demand = || {
        (failed.market == Market::Spot && t.spot_fallback_on_demand).then(|| LaunchAttempt {
            instance_type: types.first().cloned(),
            market: Market::OnDemand,
        })
    };
    match failure {
        LaunchFailure::Capacity => {
            let at = failed
                .instance_type
                .as_ref()
                .and_then(|ft| types.iter().position(|x| x == ft));
            match at.and_then(|i| types.get(i + 1)) {
                Some(next) => Some(LaunchAttempt {
                    instance_type: Some(next.clone()),
                    market: failed.market,
                }),
                None => on_demand(),
            }
        }
        LaunchFailure::Spot => on_demand(),
        LaunchFailure::Other => None,
    }
}

/// Checks the launch fields of template `t` (its name already checked): either an EC2
/// launch template or both an image and an instance type; no empty strings or lists; a
/// launch template and an IAM profile name exactly one of id/name (arn/name); a positive
/// root volume size and a known volume type. The error names the template and the field.
pub fn validate_launch(t: &WorkerTemplate) -> Result<(), String> {
    let name = &t.name;
    let err = |field: &str, why: &str| Err(format!("worker template {name:?}: {field}: {why}"));
    let blank = |s: &Option<String>| s.as_ref().is_some_and(|v| v.trim().is_empty());

    for (field, value) in [
        ("instance_type", &t.instance_type),
        ("image_id", &t.image_id),
        ("subnet_id", &t.subnet_id),
        ("key_name", &t.key_name),
        ("user_data_file", &t.user_data_file),
    ] {
        if blank(value) {
            return err(field, "must not be empty");
        }
    }
    if t.instance_type.is_some() && t.instance_types.is_some() {
        return err(
            "instance_types",
            "give instance_type (one type) or instance_types (a list), not both",
        );
    }
    if let Some(list) = &t.instance_types {
        if list.is_empty() {
            return err("instance_types", "must not be an empty list");
        }
        if list.iter().any(|x| x.trim().is_empty()) {
            return err("instance_types", "holds an empty instance type");
        }
        for (i, x) in list.iter().enumerate() {
            if list[..i].contains(x) {
                return err("instance_types", &format!("lists {x:?} twice"));
            }
        }
    }
    if let Some(groups) = &t.security_group_ids {
        if groups.is_empty() {
            return err("security_group_ids", "must not be an empty list");
        }
        if groups.iter().any(|g| g.trim().is_empty()) {
            return err("security_group_ids", "holds an empty id");
        }
    }
    match &t.launch_template {
        Some(lt) => {
            match (&lt.id, &lt.name) {
                (Some(_), Some(_)) => {
                    return err("launch_template", "give id or name, not both");
                }
                (None, None) => return err("launch_template", "needs id or name"),
                _ => {}
            }
            if blank(&lt.id) || blank(&lt.name) || blank(&lt.version) {
                return err("launch_template", "id, name and version must not be empty");
            }
        }
        None => {
            if t.image_id.is_none() {
                return err(
                    "image_id",
                    "required unless launch_template is given (the launch template then provides it)",
                );
            }
            if t.instance_type.is_none() && t.instance_types.is_none() {
                return err(
                    "instance_type",
                    "required (or instance_types) unless launch_template is given (the launch template then provides it)",
                );
            }
        }
    }
    if let Some(p) = &t.iam_instance_profile {
        match (&p.arn, &p.name) {
            (Some(_), Some(_)) => return err("iam_instance_profile", "give arn or name, not both"),
            (None, None) => return err("iam_instance_profile", "needs arn or name"),
            _ => {}
        }
        if blank(&p.arn) || blank(&p.name) {
            return err("iam_instance_profile", "arn or name must not be empty");
        }
    }
    if let Some(v) = &t.root_volume {
        if v.size_gib <= 0 {
            return err(
                "root_volume.size_gib",
                &format!("must be positive, got {}", v.size_gib),
            );
        }
        if !VOLUME_TYPES.contains(&v.volume_type.as_str()) {
            return err(
                "root_volume.type",
                &format!(
                    "unknown volume type {:?} (one of {})",
                    v.volume_type,
                    VOLUME_TYPES.join(", ")
                ),
            );
        }
        if v.device_name.trim().is_empty() {
            return err("root_volume.device_name", "must not be empty");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::worker::Resources;

    fn tpl() -> WorkerTemplate {
        WorkerTemplate {
            name: "cml".into(),
            instance_type: Some("m5zn.metal".into()),
            image_id: Some("ami-1".into()),
            capacity: Resources {
                cpu: 48.0,
                memory_gb: 192.0,
            },
            max_workers: 2,
            ..WorkerTemplate::default()
        }
    }

    fn types(list: &[&str]) -> WorkerTemplate {
        WorkerTemplate {
            instance_type: None,
            instance_types: Some(list.iter().map(|s| (*s).to_owned()).collect()),
            ..tpl()
        }
    }

    fn attempt(t: Option<&str>, market: Market) -> LaunchAttempt {
        LaunchAttempt {
            instance_type: t.map(str::to_owned),
            market,
        }
    }

    /// Every try of a launch whose every try fails with `failure`.
    fn all_tries(t: &WorkerTemplate, failure: LaunchFailure) -> Vec<LaunchAttempt> {
        let mut tries = vec![first_attempt(t)];
        for _ in 0..20 {
            let Some(last) = tries.last() else { break };
            match next_attempt(t, last, failure) {
                Some(next) => tries.push(next),
                None => break,
            }
        }
        tries
    }

    #[test]
    fn error_codes_are_classified() {
        use LaunchFailure::*;
        assert_eq!(
            classify_launch_error(Some("InsufficientInstanceCapacity")),
            Capacity
        );
        assert_eq!(
            classify_launch_error(Some("UnfulfillableCapacity")),
            Capacity
        );
        assert_eq!(classify_launch_error(Some("SpotMaxPriceTooLow")), Spot);
        assert_eq!(
            classify_launch_error(Some("MaxSpotInstanceCountExceeded")),
            Spot
        );
        assert_eq!(classify_launch_error(Some("InvalidAMIID.NotFound")), Other);
        assert_eq!(classify_launch_error(Some("RequestLimitExceeded")), Other);
        assert_eq!(classify_launch_error(None), Other);
    }

    #[test]
    fn instance_type_is_a_one_element_list() {
        assert_eq!(instance_types(&tpl()), vec!["m5zn.metal".to_owned()]);
        assert_eq!(
            first_attempt(&tpl()),
            attempt(Some("m5zn.metal"), Market::OnDemand)
        );
        // One type, on-demand: a capacity error ends the launch.
        assert_eq!(all_tries(&tpl(), LaunchFailure::Capacity).len(), 1);
    }

    #[test]
    fn capacity_errors_walk_the_list_in_order_then_stop() {
        let t = types(&["m5zn.metal", "m5.metal", "c5.metal"]);
        assert_eq!(
            all_tries(&t, LaunchFailure::Capacity),
            vec![
                attempt(Some("m5zn.metal"), Market::OnDemand),
                attempt(Some("m5.metal"), Market::OnDemand),
                attempt(Some("c5.metal"), Market::OnDemand),
            ]
        );
        assert_eq!(all_tries(&t, LaunchFailure::Other).len(), 1);
        // A spot-only error on an on-demand launch has nowhere to go.
        assert_eq!(all_tries(&t, LaunchFailure::Spot).len(), 1);
    }

    #[test]
    fn spot_runs_out_of_types_then_goes_on_demand_from_the_first() {
        let t = WorkerTemplate {
            market: Market::Spot,
            ..types(&["a", "b"])
        };
        assert_eq!(
            all_tries(&t, LaunchFailure::Capacity),
            vec![
                attempt(Some("a"), Market::Spot),
                attempt(Some("b"), Market::Spot),
                attempt(Some("a"), Market::OnDemand),
                attempt(Some("b"), Market::OnDemand),
            ]
        );
        // A spot-only error skips the other spot types.
        let after_b = next_attempt(&t, &attempt(Some("b"), Market::Spot), LaunchFailure::Spot);
        assert_eq!(after_b, Some(attempt(Some("a"), Market::OnDemand)));
        assert_eq!(
            all_tries(&t, LaunchFailure::Spot),
            vec![
                attempt(Some("a"), Market::Spot),
                attempt(Some("a"), Market::OnDemand)
            ]
        );
    }

    #[test]
    fn spot_without_fallback_gives_up_and_launch_template_types_are_none() {
        let t = WorkerTemplate {
            market: Market::Spot,
            spot_fallback_on_demand: false,
            ..types(&["a", "b"])
        };
        assert_eq!(all_tries(&t, LaunchFailure::Capacity).len(), 2);
        assert_eq!(all_tries(&t, LaunchFailure::Spot).len(), 1);

        let lt = WorkerTemplate {
            instance_type: None,
            image_id: None,
            launch_template: Some(LaunchTemplateRef {
                name: Some("cml".into()),
                ..LaunchTemplateRef::default()
            }),
            market: Market::Spot,
            ..tpl()
        };
        assert_eq!(
            all_tries(&lt, LaunchFailure::Capacity),
            vec![attempt(None, Market::Spot), attempt(None, Market::OnDemand)]
        );
    }

    #[test]
    fn fallback_reads_as_a_sentence() {
        let f = LaunchFallback {
            failed: attempt(Some("a"), Market::Spot),
            code: "InsufficientInstanceCapacity".into(),
            next: attempt(None, Market::OnDemand),
        };
        assert_eq!(
            f.to_string(),
            "a (spot) answered InsufficientInstanceCapacity; trying launch-template type (on_demand)"
        );
    }

    #[test]
    fn a_full_template_and_a_launch_template_only_one_are_valid() {
        let full = WorkerTemplate {
            launch_template: Some(LaunchTemplateRef {
                id: Some("lt-1".into()),
                version: Some("3".into()),
                ..LaunchTemplateRef::default()
            }),
            iam_instance_profile: Some(IamInstanceProfile {
                name: Some("cml-host".into()),
                ..IamInstanceProfile::default()
            }),
            key_name: Some("ops".into()),
            user_data_file: Some("cloud-init.yaml".into()),
            root_volume: Some(RootVolume {
                size_gib: 64,
                volume_type: "gp3".into(),
                device_name: DEFAULT_ROOT_DEVICE.into(),
            }),
            security_group_ids: Some(vec!["sg-1".into()]),
            ..tpl()
        };
        assert_eq!(validate_launch(&full), Ok(()));
        let lt_only = WorkerTemplate {
            instance_type: None,
            image_id: None,
            launch_template: Some(LaunchTemplateRef {
                name: Some("cml".into()),
                ..LaunchTemplateRef::default()
            }),
            ..tpl()
        };
        assert_eq!(validate_launch(&lt_only), Ok(()));
        assert_eq!(
            lt_only
                .launch_template
                .as_ref()
                .map(|l| l.version_or_default()),
            Some("$Default")
        );
    }

    #[test]
    fn each_bad_launch_field_is_named_with_the_template() {
        let lt = |id: Option<&str>, name: Option<&str>| LaunchTemplateRef {
            id: id.map(str::to_owned),
            name: name.map(str::to_owned),
            version: None,
        };
        let volume = |size_gib: i64, ty: &str| RootVolume {
            size_gib,
            volume_type: ty.into(),
            device_name: DEFAULT_ROOT_DEVICE.into(),
        };
        let cases: Vec<(WorkerTemplate, &str, &str)> = vec![
            (
                WorkerTemplate {
                    image_id: None,
                    ..tpl()
                },
                "image_id",
                "launch_template",
            ),
            (
                WorkerTemplate {
                    instance_type: None,
                    ..tpl()
                },
                "instance_type",
                "launch_template",
            ),
            (
                WorkerTemplate {
                    instance_types: Some(vec!["a".into()]),
                    ..tpl()
                },
                "instance_types",
                "not both",
            ),
            (types(&[]), "instance_types", "empty list"),
            (types(&["a", " "]), "instance_types", "empty"),
            (types(&["a", "a"]), "instance_types", "twice"),
            (
                WorkerTemplate {
                    security_group_ids: Some(Vec::new()),
                    ..tpl()
                },
                "security_group_ids",
                "empty list",
            ),
            (
                WorkerTemplate {
                    launch_template: Some(lt(Some("lt-1"), Some("cml"))),
                    ..tpl()
                },
                "launch_template",
                "not both",
            ),
            (
                WorkerTemplate {
                    launch_template: Some(lt(None, None)),
                    ..tpl()
                },
                "launch_template",
                "id or name",
            ),
            (
                WorkerTemplate {
                    launch_template: Some(lt(Some(""), None)),
                    ..tpl()
                },
                "launch_template",
                "empty",
            ),
            (
                WorkerTemplate {
                    iam_instance_profile: Some(IamInstanceProfile {
                        arn: Some("arn:aws:iam::1:instance-profile/x".into()),
                        name: Some("x".into()),
                    }),
                    ..tpl()
                },
                "iam_instance_profile",
                "not both",
            ),
            (
                WorkerTemplate {
                    iam_instance_profile: Some(IamInstanceProfile::default()),
                    ..tpl()
                },
                "iam_instance_profile",
                "arn or name",
            ),
            (
                WorkerTemplate {
                    key_name: Some(String::new()),
                    ..tpl()
                },
                "key_name",
                "empty",
            ),
            (
                WorkerTemplate {
                    user_data_file: Some(" ".into()),
                    ..tpl()
                },
                "user_data_file",
                "empty",
            ),
            (
                WorkerTemplate {
                    root_volume: Some(volume(0, "gp3")),
                    ..tpl()
                },
                "root_volume.size_gib",
                "positive",
            ),
            (
                WorkerTemplate {
                    root_volume: Some(volume(-8, "gp3")),
                    ..tpl()
                },
                "root_volume.size_gib",
                "-8",
            ),
            (
                WorkerTemplate {
                    root_volume: Some(volume(8, "gp9")),
                    ..tpl()
                },
                "root_volume.type",
                "gp9",
            ),
        ];
        for (bad, field, why) in cases {
            let e = validate_launch(&bad).expect_err(field);
            assert!(
                e.starts_with(&format!("worker template \"cml\": {field}: ")),
                "{e} should name the template and {field}"
            );
            assert!(e.contains(why), "{e} should say {why}");
        }
    }
}
