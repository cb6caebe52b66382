# Paddock on AWS: what the master needs to launch, find and terminate its workers, and what
# the workers run with. Everything is scoped to one account, one region (the provider's) and
# one Paddock cluster (var.cluster_id).

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  # Tag keys the master writes at RunInstances (exact spelling matters: the policy matches on it).
  tag_cluster = "paddock:cluster"

  name        = "${var.name_prefix}-${var.cluster_id}"
  worker_name = "${local.name}-worker"

  tags = merge(var.tags, { (local.tag_cluster) = var.cluster_id })

  partition = data.aws_partition.current.partition
  # Service principal of EC2 in this partition (ec2.amazonaws.com outside China).
  ec2_service = "ec2.${data.aws_partition.current.dns_suffix}"
  region    = data.aws_region.current.name
  account   = data.aws_caller_identity.current.account_id

  # ARN prefix of the region's EC2 resources in this account.
  ec2_arn = "arn:${local.partition}:ec2:${local.region}:${local.account}"
  vpc_arn = "${local.ec2_arn}:vpc/${var.vpc_id}"

  # Roles the master may hand to instances through an instance profile.
  pass_role_arns = concat(aws_iam_role.worker[*].arn, var.extra_pass_role_arns)
}
