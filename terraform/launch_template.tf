# Optional launch template for pools that prefer one. Paddock sets every launch parameter itself,
# so this only supplies defaults (AMI, type, disk) a pool may leave out.

resource "aws_launch_template" "worker" {
  count = var.create_launch_template ? 1 : 0

  name                   = local.worker_name
  description            = "Paddock workers of cluster ${var.cluster_id}."
  image_id               = var.launch_template_ami_id
  instance_type          = var.launch_template_instance_type
  vpc_security_group_ids = [aws_security_group.worker.id]
  update_default_version = true

  # A worker that shuts itself down is gone for good; Paddock never restarts a stopped one.
  instance_initiated_shutdown_behavior = "terminate"

  dynamic "iam_instance_profile" {
    for_each = var.create_worker_instance_profile ? [true] : []
    content {
      name = aws_iam_instance_profile.worker[0].name
    }
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = var.instance_metadata_tags ? "enabled" : "disabled"
  }

  block_device_mappings {
    device_name = var.root_device_name

    ebs {
      volume_type           = "gp3"
      volume_size           = var.root_volume_size
      encrypted             = true
      kms_key_id            = var.root_volume_kms_key_id
      delete_on_termination = true
    }
  }

  monitoring {
    enabled = var.detailed_monitoring
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = local.worker_name })
  }

  tag_specifications {
    resource_type = "volume"
    tags          = merge(local.tags, { Name = local.worker_name })
  }

  tags = local.tags
}
