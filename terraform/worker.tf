# What workers run with: a security group without inbound rules, and an instance profile whose
# role has no permissions until you attach some.

resource "aws_security_group" "worker" {
  #checkov:skip=CKV_AWS_382:Workers dial out to the master, git hosts and package mirrors, whose addresses are not known here; they accept no inbound traffic at all.
  name        = local.worker_name
  description = "Paddock workers of cluster ${var.cluster_id}: no inbound traffic; outbound to the master, git hosts and package mirrors."
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.worker_name })

  egress {
    description      = "All outbound: the agent connects to the master; builds fetch sources and dependencies."
    from_port        = 0
    to_port          = 0
    protocol         = "-1"
    cidr_blocks      = ["0.0.0.0/0"]
    ipv6_cidr_blocks = ["::/0"]
  }
}

data "aws_iam_policy_document" "worker_assume_role" {
  statement {
    sid     = "Ec2AssumesWorkerRole"
    effect  = "Allow"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = [local.ec2_service]
    }
  }
}

resource "aws_iam_role" "worker" {
  count = var.create_worker_instance_profile ? 1 : 0

  name               = local.worker_name
  description        = "Paddock workers of cluster ${var.cluster_id}. No permissions by default; attach what builds need."
  assume_role_policy = data.aws_iam_policy_document.worker_assume_role.json
  tags               = local.tags

  lifecycle {
    precondition {
      condition     = length(local.worker_name) <= 64
      error_message = "IAM role names are at most 64 characters: shorten name_prefix or cluster_id (\"${local.worker_name}\")."
    }
  }
}

resource "aws_iam_instance_profile" "worker" {
  count = var.create_worker_instance_profile ? 1 : 0

  name = local.worker_name
  role = aws_iam_role.worker[0].name
  tags = local.tags
}
