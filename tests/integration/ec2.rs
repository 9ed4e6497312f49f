//! The EC2 `CloudProvider` adapter against a real moto server on loopback: launch and
//! tags, status, terminate, listing and orphans, deduplication by worker id, and how
//! errors map.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{
    Filter, Instance, InstanceAttributeName, InstanceType, RequestLaunchTemplateData, ResourceType,
    Tag, TagSpecification,
};
use base64::Engine as _;
use resource_plane::adapters::ec2::{Ec2Cloud, Ec2Settings};
use resource_plane::domain::launch::{IamInstanceProfile, LaunchTemplateRef, RootVolume};
use resource_plane::domain::worker::{Resources, WorkerTemplate};
use resource_plane::ports::cloud::{CloudError, CloudInstanceStatus, CloudProvider};

use crate::moto::{create_instance_profile, dummy_credentials_cloud, Moto, AMI, REGION};
use crate::support::{eventually, free_port};

fn template() -> WorkerTemplate {
    WorkerTemplate {
        name: "metal".into(),
        instance_type: Some("m5zn.metal".into()),
        image_id: Some(AMI.into()),
        capacity: Resources {
            cpu: 48.0,
            memory_gb: 192.0,
        },
        min_workers: 0,
        max_workers: 4,
        hourly_cost: 3.96,
        ..WorkerTemplate::default()
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// DescribeInstances of one id, straight through the SDK.
async fn describe(cloud: &Ec2Cloud, instance_id: &str) -> Instance {
    let out = cloud
        .sdk_client()
        .describe_instances()
        .instance_ids(instance_id)
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe {instance_id}: {e:?}"));
    out.reservations()
        .iter()
        .flat_map(|r| r.instances())
        .find(|i| i.instance_id() == Some(instance_id))
        .cloned()
        .unwrap_or_else(|| panic!("{instance_id} not described"))
}

fn tags(instance: &Instance) -> BTreeMap<String, String> {
    instance
        .tags()
        .iter()
        .map(|t| {
            (
                t.key().unwrap_or_default().to_owned(),
                t.value().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Every instance (any cluster, any state) tagged with `worker_id`.
async fn instances_of_worker(cloud: &Ec2Cloud, worker_id: &str) -> Vec<Instance> {
    let out = cloud
        .sdk_client()
        .describe_instances()
        .filters(
            Filter::builder()
                .name("tag:resource-plane/worker-id")
                .values(worker_id)
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe by worker id: {e:?}"));
    out.reservations()
        .iter()
        .flat_map(|r| r.instances().iter().cloned())
        .collect()
}

async fn wait_status(cloud: &Ec2Cloud, id: &str, wanted: &[CloudInstanceStatus]) -> bool {
    eventually(Duration::from_secs(10), || async {
        matches!(cloud.get_instance_status(id).await, Ok(s) if wanted.contains(&s))
    })
    .await
}

#[tokio::test]
async fn ec2_launch_tags_status_terminate_against_moto() {
    let moto = Moto::start();
    let cluster = unique("cluster");
    let cloud = moto.cloud(&cluster).await;
    assert_eq!(cloud.name(), "ec2");
    let client = cloud.sdk_client();

    // The template's placement: moto's default subnet and security group.
    let subnets = client
        .describe_subnets()
        .filters(
            Filter::builder()
                .name("default-for-az")
                .values("true")
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe subnets: {e:?}"));
    let subnet = subnets.subnets()[0]
        .subnet_id()
        .unwrap_or_default()
        .to_owned();
    let groups = client
        .describe_security_groups()
        .filters(
            Filter::builder()
                .name("group-name")
                .values("default")
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe security groups: {e:?}"));
    let group = groups.security_groups()[0]
        .group_id()
        .unwrap_or_default()
        .to_owned();
    let images = client
        .describe_images()
        .image_ids(AMI)
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe images: {e:?}"));
    assert_eq!(images.images().len(), 1, "moto should know {AMI}");

    let mut tpl = template();
    tpl.subnet_id = Some(subnet.clone());
    tpl.security_group_ids = Some(vec![group.clone()]);
    tpl.labels.insert("team".into(), "labs".into());
    tpl.labels
        .insert("managed-by".into(), "someone-else".into());

    let worker = unique("w");
    let id = cloud
        .create_instance(&tpl, &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
        .instance_id;
    assert!(id.starts_with("i-"), "{id}");

    // Tags, placement and shape, as EC2 describes the instance.
    let described = describe(&cloud, &id).await;
    let t = tags(&described);
    assert_eq!(
        t.get("managed-by").map(String::as_str),
        Some("resource-plane")
    );
    assert_eq!(t.get("resource-plane/cluster"), Some(&cluster));
    assert_eq!(t.get("resource-plane/worker-id"), Some(&worker));
    assert_eq!(t.get("Name"), Some(&format!("resource-plane-{worker}")));
    assert_eq!(t.get("team").map(String::as_str), Some("labs"));
    assert_eq!(described.subnet_id(), Some(subnet.as_str()));
    assert!(
        described
            .security_groups()
            .iter()
            .any(|g| g.group_id() == Some(group.as_str())),
        "{:?}",
        described.security_groups()
    );
    assert_eq!(described.image_id(), Some(AMI));
    assert_eq!(
        described.instance_type().map(|t| t.as_str()),
        Some("m5zn.metal")
    );

    // ...and as the adapter lists it.
    let listed = cloud
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].instance_id, id);
    assert_eq!(listed[0].worker_id.as_deref(), Some(worker.as_str()));
    // Its launch time, which the orphan grace period is measured from.
    let launched = listed[0]
        .launched_at
        .unwrap_or_else(|| panic!("no launch time: {listed:?}"));
    let age = chrono::Utc::now() - launched;
    assert!(
        age >= chrono::Duration::minutes(-5) && age <= chrono::Duration::minutes(5),
        "launch time {launched} is not about now"
    );

    assert!(
        wait_status(&cloud, &id, &[CloudInstanceStatus::Running]).await,
        "instance never ran: {:?}",
        cloud.get_instance_status(&id).await
    );

    cloud
        .terminate_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("terminate: {e}"));
    assert!(
        wait_status(
            &cloud,
            &id,
            &[
                CloudInstanceStatus::Terminated,
                CloudInstanceStatus::NotFound
            ]
        )
        .await,
        "instance not terminated: {:?}",
        cloud.get_instance_status(&id).await
    );
    let listed = cloud
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert!(listed.is_empty(), "terminated instance listed: {listed:?}");

    // Terminating twice, or something that never existed, is fine.
    cloud
        .terminate_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("terminate again: {e}"));
    cloud
        .terminate_instance("i-0123456789abcdef0")
        .await
        .unwrap_or_else(|e| panic!("terminate unknown: {e}"));
    assert_eq!(
        cloud.get_instance_status("i-0123456789abcdef0").await,
        Ok(CloudInstanceStatus::NotFound)
    );
}

/// A production-shaped launch: an EC2 launch template (which supplies the AMI and the
/// instance type), an IAM instance profile, a key pair, user data and a root volume,
/// all visible to EC2 afterwards; the root volume carries the instance's tags.
#[tokio::test]
async fn ec2_launch_from_a_launch_template_with_profile_key_user_data_and_root_volume() {
    let moto = Moto::start();
    let cluster = unique("cluster");
    let cloud = moto.cloud(&cluster).await;
    let client = cloud.sdk_client();

    let lt_name = unique("cml-host");
    client
        .create_launch_template()
        .launch_template_name(&lt_name)
        .launch_template_data(
            RequestLaunchTemplateData::builder()
                .image_id(AMI)
                .instance_type(InstanceType::from("m5.metal"))
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("create launch template: {e:?}"));
    client
        .create_key_pair()
        .key_name("ops")
        .send()
        .await
        .unwrap_or_else(|e| panic!("create key pair: {e:?}"));
    let profile_arn = create_instance_profile(&moto, "cml-host").await;

    let user_data = b"#cloud-config\nruncmd: [systemctl start virl2]\n".to_vec();
    let mut tpl = WorkerTemplate {
        instance_type: None,
        image_id: None,
        launch_template: Some(LaunchTemplateRef {
            name: Some(lt_name.clone()),
            ..LaunchTemplateRef::default()
        }),
        iam_instance_profile: Some(IamInstanceProfile {
            name: Some("cml-host".into()),
            ..IamInstanceProfile::default()
        }),
        key_name: Some("ops".into()),
        user_data_file: Some("cloud-init.yaml".into()),
        user_data: Some(user_data.clone()),
        root_volume: Some(RootVolume {
            size_gib: 64,
            volume_type: "gp3".into(),
            device_name: "/dev/xvda".into(),
        }),
        ..template()
    };
    tpl.labels.insert("team".into(), "labs".into());
    resource_plane::domain::controller::validate_templates(std::slice::from_ref(&tpl))
        .unwrap_or_else(|e| panic!("{e}"));

    let worker = unique("w");
    let out = cloud
        .create_instance(&tpl, &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    assert!(out.fallbacks.is_empty(), "{out:?}");
    let id = out.instance_id;

    let described = describe(&cloud, &id).await;
    // The launch template supplied the image and the type.
    assert_eq!(described.image_id(), Some(AMI));
    assert_eq!(
        described.instance_type().map(|t| t.as_str()),
        Some("m5.metal")
    );
    assert_eq!(described.key_name(), Some("ops"));
    let t = tags(&described);
    assert_eq!(t.get("resource-plane/worker-id"), Some(&worker));
    assert_eq!(t.get("team").map(String::as_str), Some("labs"));

    // moto does not echo IamInstanceProfile in DescribeInstances; it records the
    // association, which is what EC2 answers in DescribeIamInstanceProfileAssociations.
    let associations = client
        .describe_iam_instance_profile_associations()
        .filters(Filter::builder().name("instance-id").values(&id).build())
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe profile associations: {e:?}"));
    let arns: Vec<&str> = associations
        .iam_instance_profile_associations()
        .iter()
        .filter(|a| a.instance_id() == Some(id.as_str()))
        .filter_map(|a| a.iam_instance_profile().and_then(|p| p.arn()))
        .collect();
    assert_eq!(arns, vec![profile_arn.as_str()]);

    // User data went over the wire base64-encoded; EC2 answers it encoded too.
    let attr = client
        .describe_instance_attribute()
        .instance_id(&id)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe user data: {e:?}"));
    let encoded = attr
        .user_data()
        .and_then(|v| v.value())
        .unwrap_or_else(|| panic!("no user data: {attr:?}"));
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap_or_else(|e| panic!("user data {encoded:?} is not base64: {e}")),
        user_data
    );

    // The root volume: on the device asked for, of the size and type asked for, tagged.
    let root = described
        .block_device_mappings()
        .iter()
        .find(|m| m.device_name() == Some("/dev/xvda"))
        .and_then(|m| m.ebs())
        .and_then(|e| e.volume_id())
        .unwrap_or_else(|| panic!("no /dev/xvda: {:?}", described.block_device_mappings()))
        .to_owned();
    let volumes = client
        .describe_volumes()
        .volume_ids(&root)
        .send()
        .await
        .unwrap_or_else(|e| panic!("describe volumes: {e:?}"));
    let volume = &volumes.volumes()[0];
    assert_eq!(volume.size(), Some(64));
    assert_eq!(volume.volume_type().map(|v| v.as_str()), Some("gp3"));
    let volume_tags: BTreeMap<&str, &str> = volume
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    assert_eq!(
        volume_tags.get("resource-plane/worker-id"),
        Some(&worker.as_str())
    );
    assert_eq!(
        volume_tags.get("resource-plane/cluster"),
        Some(&cluster.as_str())
    );
    assert_eq!(volume_tags.get("managed-by"), Some(&"resource-plane"));
    assert_eq!(volume_tags.get("team"), Some(&"labs"));

    // The same worker again finds that instance instead of launching another.
    let again = cloud
        .create_instance(&tpl, &worker)
        .await
        .unwrap_or_else(|e| panic!("create again: {e}"));
    assert_eq!(again.instance_id, id);
    assert_eq!(again.launched, None);
}

/// A templates file whose user data file is missing stops the service at start-up with
/// exit code 64 and a message naming the template and the field.
#[tokio::test]
async fn a_missing_user_data_file_exits_64_naming_template_and_field() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("templates.yaml");
    let yaml = "templates:
  - name: cml
    launch_template: { name: cml-host }
    user_data_file: missing-cloud-init.yaml
    capacity: { cpu: 48, memory_gb: 192 }
    min_workers: 0
    max_workers: 2
    hourly_cost: 3.96
";
    std::fs::write(&path, yaml).unwrap_or_else(|e| panic!("{e}"));
    let out = tokio::process::Command::new(crate::cluster::SERVICE_BIN)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("WORKER_TEMPLATES_FILE", &path)
        .env("SHADOW_SEED_FILE", "")
        .env("APP_HOST", "127.0.0.1")
        .env("APP_PORT", free_port().to_string())
        .env("WORKER_AGENT", "heartbeat")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .unwrap_or_else(|_| panic!("the service did not exit on a bad template"))
        .unwrap_or_else(|e| panic!("run the service: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(64), "{text}");
    assert!(
        text.contains("worker template \\\"cml\\\": user_data_file")
            || text.contains("worker template \"cml\": user_data_file"),
        "{text}"
    );
    assert!(text.contains("missing-cloud-init.yaml"), "{text}");
}

#[tokio::test]
async fn ec2_create_twice_for_one_worker_launches_once() {
    let moto = Moto::start();
    let cloud = moto.cloud(&unique("cluster")).await;
    let worker = unique("w");

    let first = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
        .instance_id;
    let second = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create again: {e}"))
        .instance_id;

    assert_eq!(first, second);
    let all = instances_of_worker(&cloud, &worker).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let listed = cloud
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Another worker gets its own instance.
    let other = cloud
        .create_instance(&template(), &unique("w"))
        .await
        .unwrap_or_else(|e| panic!("create other: {e}"))
        .instance_id;
    assert_ne!(other, first);
}

#[tokio::test]
async fn ec2_list_shows_orphans_of_our_cluster_only() {
    let moto = Moto::start();
    let ours = moto.cloud(&unique("ours")).await;
    let theirs = moto.cloud(&unique("theirs")).await;

    // An instance tagged for our cluster that no live worker asked for (left by a
    // controller that crashed between launch and recording the worker).
    let orphan_worker = unique("w-orphan");
    let launched = ours
        .sdk_client()
        .run_instances()
        .image_id(AMI)
        .min_count(1)
        .max_count(1)
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::Instance)
                .tags(
                    Tag::builder()
                        .key("managed-by")
                        .value("resource-plane")
                        .build(),
                )
                .tags(
                    Tag::builder()
                        .key("resource-plane/cluster")
                        .value(ours.cluster_id())
                        .build(),
                )
                .tags(
                    Tag::builder()
                        .key("resource-plane/worker-id")
                        .value(&orphan_worker)
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap_or_else(|e| panic!("run orphan: {e:?}"));
    let orphan = launched.instances()[0]
        .instance_id()
        .unwrap_or_default()
        .to_owned();

    // Another cluster's instance, and an instance that is not ours at all.
    let foreign = theirs
        .create_instance(&template(), &unique("w"))
        .await
        .unwrap_or_else(|e| panic!("create foreign: {e}"))
        .instance_id;
    ours.sdk_client()
        .run_instances()
        .image_id(AMI)
        .min_count(1)
        .max_count(1)
        .send()
        .await
        .unwrap_or_else(|e| panic!("run untagged: {e:?}"));

    let listed = ours
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].instance_id, orphan);
    assert_eq!(listed[0].worker_id.as_deref(), Some(orphan_worker.as_str()));
    assert!(matches!(
        listed[0].status,
        CloudInstanceStatus::Pending | CloudInstanceStatus::Running
    ));

    let listed = theirs
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list theirs: {e}"));
    let ids: Vec<_> = listed.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(ids, vec![foreign.as_str()]);
}

#[tokio::test]
async fn ec2_bad_request_is_rejected_with_the_aws_code() {
    let moto = Moto::start();
    let cloud = moto.cloud(&unique("cluster")).await;
    let mut tpl = template();
    tpl.subnet_id = Some("subnet-doesnotexist".into());

    let err = cloud
        .create_instance(&tpl, &unique("w"))
        .await
        .expect_err("a launch into an unknown subnet must fail");

    match err {
        CloudError::Rejected(msg) => {
            assert!(msg.contains("InvalidSubnetID.NotFound"), "{msg}")
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
}

#[tokio::test]
async fn ec2_unreachable_endpoint_is_unavailable() {
    // Nothing listens on this loopback port: connections are refused at once.
    let settings = Ec2Settings {
        region: REGION.to_owned(),
        endpoint_url: Some(format!("http://127.0.0.1:{}", free_port())),
        cluster_id: unique("cluster"),
    };
    let cloud = dummy_credentials_cloud(settings).await;

    let create = cloud.create_instance(&template(), &unique("w")).await;
    assert!(
        matches!(create, Err(CloudError::Unavailable(_))),
        "{create:?}"
    );
    let status = cloud.get_instance_status("i-0123456789abcdef0").await;
    assert!(
        matches!(status, Err(CloudError::Unavailable(_))),
        "{status:?}"
    );
    let terminate = cloud.terminate_instance("i-0123456789abcdef0").await;
    assert!(
        matches!(terminate, Err(CloudError::Unavailable(_))),
        "{terminate:?}"
    );
}

/// The controller launches through the capacity fallback (injected into the simulated
/// cloud, since moto cannot answer InsufficientInstanceCapacity) and journals each
/// fallback with the type that failed and the one tried next; a spot template falls
/// back to on-demand the same way.
#[actix_web::test]
async fn controller_journals_each_capacity_and_spot_fallback() {
    use resource_plane::adapters::memory::MemoryStore;
    use resource_plane::adapters::sim_cloud::SimCloud;
    use resource_plane::app::Service;
    use resource_plane::domain::launch::Market;
    use resource_plane::ports::store::Store;
    use std::sync::Arc;

    tokio::time::pause();
    let templates = "templates:
  - name: metal
    instance_types: [m5zn.metal, m5.metal, c5.metal]
    image_id: ami-12c6146b
    capacity: { cpu: 48, memory_gb: 192 }
    min_workers: 1
    max_workers: 1
    hourly_cost: 3.96
  - name: spot
    instance_type: m5.xlarge
    image_id: ami-12c6146b
    market: spot
    capacity: { cpu: 4, memory_gb: 16 }
    min_workers: 1
    max_workers: 1
    hourly_cost: 0.1
";
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let cfg = crate::controller::controller_config(&dir, templates);
    let cloud = Arc::new(SimCloud::new(Duration::from_secs(1)));
    cloud.fail_launches(Some("m5zn.metal"), None, "InsufficientInstanceCapacity");
    cloud.fail_launches(Some("m5.metal"), None, "InsufficientInstanceCapacity");
    cloud.fail_launches(None, Some(Market::Spot), "MaxSpotInstanceCountExceeded");
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let svc = Service::start_with(cfg, store, cloud.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert!(svc.wait_hydrated(Duration::from_secs(10)).await);
    let ctl = svc.state.controller.clone();

    // min_workers launches one worker of each template, no demand needed.
    let mut launched = Vec::new();
    for _ in 0..200 {
        launched = ctl
            .workers
            .list()
            .into_iter()
            .filter_map(|w| Some((w.template.clone(), w.cloud_instance_id.clone()?)))
            .collect();
        if launched.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(launched.len(), 2, "{:?}", ctl.workers.list());
    for (template, instance) in &launched {
        let how = cloud.launched_as(instance).map(|a| a.to_string());
        let wanted = match template.as_str() {
            "metal" => "c5.metal (on_demand)",
            _ => "m5.xlarge (on_demand)",
        };
        assert_eq!(how.as_deref(), Some(wanted), "{template}");
    }

    let fallbacks: Vec<(String, String)> = ctl
        .decisions()
        .into_iter()
        .filter(|d| d.action == "launch_fallback")
        .map(|d| (d.subject, d.reason))
        .collect();
    let reasons: Vec<&str> = fallbacks.iter().map(|(_, r)| r.as_str()).collect();
    let metal = [
        "template metal: m5zn.metal (on_demand) answered InsufficientInstanceCapacity; trying m5.metal (on_demand)",
        "template metal: m5.metal (on_demand) answered InsufficientInstanceCapacity; trying c5.metal (on_demand)",
    ];
    let spot = "template spot: m5.xlarge (spot) answered MaxSpotInstanceCountExceeded; trying m5.xlarge (on_demand)";
    let at = |r: &str| reasons.iter().position(|x| *x == r);
    assert!(
        at(metal[0]).is_some() && at(metal[0]) < at(metal[1]) && at(spot).is_some(),
        "{fallbacks:?}"
    );
    assert_eq!(reasons.len(), 3, "{fallbacks:?}");
    // Each entry names the worker it launched for.
    let workers: Vec<String> = ctl.workers.list().into_iter().map(|w| w.id).collect();
    assert!(
        fallbacks.iter().all(|(s, _)| workers.contains(s)),
        "{fallbacks:?}"
    );
}

#[tokio::test]
async fn ec2_stop_moves_a_running_instance_to_stopped_then_terminate() {
    let moto = Moto::start();
    let cloud = moto.cloud(&unique("cluster")).await;
    let worker = unique("w");
    let id = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"))
        .instance_id;
    assert!(
        wait_status(&cloud, &id, &[CloudInstanceStatus::Running]).await,
        "instance never ran: {:?}",
        cloud.get_instance_status(&id).await
    );

    cloud
        .stop_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("stop: {e}"));
    assert!(
        wait_status(&cloud, &id, &[CloudInstanceStatus::Stopped]).await,
        "instance not stopped: {:?}",
        cloud.get_instance_status(&id).await
    );
    assert_eq!(
        describe(&cloud, &id)
            .await
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str()),
        Some("stopped")
    );
    // A stopped instance is still ours (a STOPPED worker owns it, not an orphan).
    let listed = cloud
        .list_instances()
        .await
        .unwrap_or_else(|e| panic!("list: {e}"));
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].status, CloudInstanceStatus::Stopped);

    // Stopping again is fine.
    cloud
        .stop_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("stop again: {e}"));
    assert_eq!(
        cloud.get_instance_status(&id).await,
        Ok(CloudInstanceStatus::Stopped)
    );

    cloud
        .terminate_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("terminate: {e}"));
    assert!(
        wait_status(
            &cloud,
            &id,
            &[
                CloudInstanceStatus::Terminated,
                CloudInstanceStatus::NotFound
            ]
        )
        .await,
        "stopped instance not terminated: {:?}",
        cloud.get_instance_status(&id).await
    );
    // Stopping what is terminated, or what never existed, is fine and changes nothing.
    cloud
        .stop_instance(&id)
        .await
        .unwrap_or_else(|e| panic!("stop terminated: {e}"));
    assert!(matches!(
        cloud.get_instance_status(&id).await,
        Ok(CloudInstanceStatus::Terminated | CloudInstanceStatus::NotFound)
    ));
    cloud
        .stop_instance("i-0123456789abcdef0")
        .await
        .unwrap_or_else(|e| panic!("stop unknown: {e}"));
}
