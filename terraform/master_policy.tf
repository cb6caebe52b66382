# The master's policy. Paddock's master calls RunInstances (tagging at launch), TerminateInstances
# and a handful of Describe calls; nothing else.

data "aws_iam_policy_document" "master" {
  # Instances: only tagged with this cluster, and only with IMDSv2 enforced (hop limit 1).
  statement {
    sid       = "LaunchClusterInstances"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/${local.tag_cluster}"
      values   = [var.cluster_id]
    }

    condition {
      test     = "StringEquals"
      variable = "ec2:MetadataHttpTokens"
      values   = ["required"]
    }

    condition {
      test     = "NumericLessThanEquals"
      variable = "ec2:MetadataHttpPutResponseHopLimit"
      values   = ["1"]
    }

    dynamic "condition" {
      for_each = var.allow_spot ? [] : [true]
      content {
        test     = "StringEquals"
        variable = "ec2:InstanceMarketType"
        values   = ["on-demand"]
      }
    }
  }

  # Volumes created with the instance: tagged with this cluster too.
  statement {
    sid       = "LaunchClusterVolumes"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:volume/*"]

    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/${local.tag_cluster}"
      values   = [var.cluster_id]
    }
  }

  # Network placement: subnets, security groups and the network interface RunInstances creates,
  # all in the workers' VPC. None of these is tagged by the master.
  statement {
    sid     = "LaunchIntoWorkerVpc"
    effect  = "Allow"
    actions = ["ec2:RunInstances"]
    resources = [
      "${local.ec2_arn}:subnet/*",
      "${local.ec2_arn}:security-group/*",
      "${local.ec2_arn}:network-interface/*",
    ]

    condition {
      test     = "ArnEquals"
      variable = "ec2:Vpc"
      values   = [local.vpc_arn]
    }
  }

  # Images are regional and may belong to other accounts (no account in their ARN).
  statement {
    sid       = "LaunchFromImages"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${local.partition}:ec2:${local.region}::image/*"]

    dynamic "condition" {
      for_each = length(var.ami_owners) > 0 ? [true] : []
      content {
        test     = "StringEquals"
        variable = "ec2:Owner"
        values   = var.ami_owners
      }
    }
  }

  # Other resources a launch may name: an SSH key pair, a launch template and, for spot
  # capacity, the spot request RunInstances opens.
  statement {
    sid     = "LaunchWithSupportingResources"
    effect  = "Allow"
    actions = ["ec2:RunInstances"]
    resources = concat(
      [
        "${local.ec2_arn}:key-pair/*",
        "${local.ec2_arn}:launch-template/*",
      ],
      var.allow_spot ? ["${local.ec2_arn}:spot-instances-request/*"] : [],
    )
  }

  # Tags are written only as part of RunInstances, never on existing resources.
  statement {
    sid     = "TagAtLaunchOnly"
    effect  = "Allow"
    actions = ["ec2:CreateTags"]
    resources = [
      "${local.ec2_arn}:instance/*",
      "${local.ec2_arn}:volume/*",
    ]

    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  # Only this cluster's instances can be terminated.
  statement {
    sid       = "TerminateClusterInstances"
    effect    = "Allow"
    actions   = ["ec2:TerminateInstances"]
    resources = ["${local.ec2_arn}:instance/*"]

    condition {
      test     = "StringEquals"
      variable = "ec2:ResourceTag/${local.tag_cluster}"
      values   = [var.cluster_id]
    }
  }

  # Describe calls have no resource-level permissions: AWS requires Resource "*".
  statement {
    sid    = "ReadEc2State"
    effect = "Allow"
    actions = [
      "ec2:DescribeImages",
      "ec2:DescribeInstanceStatus",
      "ec2:DescribeInstanceTypes",
      "ec2:DescribeInstances",
      "ec2:DescribeLaunchTemplateVersions",
      "ec2:DescribeLaunchTemplates",
      "ec2:DescribeSpotPriceHistory",
      "ec2:DescribeSubnets",
    ]
    resources = ["*"]
  }

  # Instance profiles: only the workers' roles, and only handed to EC2.
  dynamic "statement" {
    for_each = length(local.pass_role_arns) > 0 ? [true] : []
    content {
      sid       = "PassWorkerRole"
      effect    = "Allow"
      actions   = ["iam:PassRole"]
      resources = local.pass_role_arns

      condition {
        test     = "StringEquals"
        variable = "iam:PassedToService"
        values   = [local.ec2_service]
      }
    }
  }
}

resource "aws_iam_policy" "master" {
  name        = "${local.name}-master"
  description = "Paddock master of cluster ${var.cluster_id}: launch, tag at launch, and terminate its EC2 workers."
  policy      = data.aws_iam_policy_document.master.json
  tags        = local.tags
}

resource "aws_iam_role_policy_attachment" "master" {
  count = var.master_role_name == null ? 0 : 1

  role       = var.master_role_name
  policy_arn = aws_iam_policy.master.arn
}
