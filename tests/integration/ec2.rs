//! The EC2 `CloudProvider` adapter against a real moto server on loopback: launch and
//! tags, status, terminate, listing and orphans, deduplication by worker id, and how
//! errors map.

use std::collections::BTreeMap;
use std::time::Duration;

use aws_sdk_ec2::types::{Filter, Instance, ResourceType, Tag, TagSpecification};
use resource_plane::adapters::ec2::{Ec2Cloud, Ec2Settings};
use resource_plane::domain::worker::{Resources, WorkerTemplate};
use resource_plane::ports::cloud::{CloudError, CloudInstanceStatus, CloudProvider};

use crate::moto::{dummy_credentials_cloud, Moto, AMI, REGION};
use crate::support::{eventually, free_port};

fn template() -> WorkerTemplate {
    WorkerTemplate {
        name: "metal".into(),
        instance_type: "m5zn.metal".into(),
        image_id: AMI.into(),
        subnet_id: None,
        security_group_ids: None,
        capacity: Resources {
            cpu: 48.0,
            memory_gb: 192.0,
        },
        min_workers: 0,
        max_workers: 4,
        hourly_cost: 3.96,
        labels: BTreeMap::new(),
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
        .unwrap_or_else(|e| panic!("create: {e}"));
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

#[tokio::test]
async fn ec2_create_twice_for_one_worker_launches_once() {
    let moto = Moto::start();
    let cloud = moto.cloud(&unique("cluster")).await;
    let worker = unique("w");

    let first = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
    let second = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create again: {e}"));

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
        .unwrap_or_else(|e| panic!("create other: {e}"));
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
        .unwrap_or_else(|e| panic!("create foreign: {e}"));
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

#[tokio::test]
async fn ec2_stop_moves_a_running_instance_to_stopped_then_terminate() {
    let moto = Moto::start();
    let cloud = moto.cloud(&unique("cluster")).await;
    let worker = unique("w");
    let id = cloud
        .create_instance(&template(), &worker)
        .await
        .unwrap_or_else(|e| panic!("create: {e}"));
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
