# An AMI with Paddock's agent baked in at /opt/paddock/bin/paddock and git installed, so a
# machine boots straight into its agent instead of downloading it and a package index first.
# The same user-data (cloud-init.yaml) boots it: bootstrap.sh uses the baked agent when present.
#
#   packer init images/paddock-agent.pkr.hcl
#   packer build -var agent_binary=target/release/paddock images/paddock-agent.pkr.hcl
#
# The agent binary must be built for the image's architecture and C library (for example
# x86_64-unknown-linux-gnu on an x86_64 Debian 12 or Amazon Linux 2023 base).

packer {
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
  }
}

variable "agent_binary" {
  type        = string
  description = "Local path of the paddock binary to bake in (the same binary serves as master and agent)."
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type        = string
  default     = "t3.small"
  description = "Instance type of the temporary build machine; its architecture must match the base image."
}

# Debian 12 from Debian's own AWS account by default. For Amazon Linux 2023 use
#   -var 'base_ami_name=al2023-ami-2023.*-x86_64' -var 'base_ami_owner=amazon' -var 'ssh_username=ec2-user'
variable "base_ami_name" {
  type    = string
  default = "debian-12-amd64-*"
}

variable "base_ami_owner" {
  type    = string
  default = "136693071363"
}

variable "ssh_username" {
  type    = string
  default = "admin"
}

variable "root_volume_size" {
  type        = number
  default     = 16
  description = "Root volume size in GiB; builds check out and compile on it."
}

variable "kms_key_id" {
  type        = string
  default     = ""
  description = "KMS key for the root volume and the AMI's snapshot; empty = the account's default EBS key."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet of the build machine; empty = the default VPC's choice."
}

variable "tags" {
  type        = map(string)
  default     = {}
  description = "Extra tags on the AMI, its snapshot and the build machine."
}

locals {
  timestamp = regex_replace(timestamp(), "[- TZ:]", "")
  tags = merge(var.tags, {
    "Name"            = "paddock-agent-${local.timestamp}"
    "paddock:image"   = "agent"
    "paddock:base"    = "{{ .SourceAMIName }}"
    "paddock:created" = local.timestamp
  })
}

source "amazon-ebs" "paddock_agent" {
  region        = var.region
  instance_type = var.instance_type
  subnet_id     = var.subnet_id == "" ? null : var.subnet_id
  ssh_username  = var.ssh_username
  ami_name      = "paddock-agent-${local.timestamp}"

  source_ami_filter {
    filters = {
      name                = var.base_ami_name
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = [var.base_ami_owner]
    most_recent = true
  }

  # IMDSv2 only (metadata requests need a session token): metadata_options for the build
  # machine, imds_support for every machine launched from the AMI.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }
  imds_support = "v2.0"

  launch_block_device_mappings {
    device_name           = "/dev/xvda"
    volume_size           = var.root_volume_size
    volume_type           = "gp3"
    encrypted             = true
    kms_key_id            = var.kms_key_id == "" ? null : var.kms_key_id
    delete_on_termination = true
  }
  # The AMI's snapshot is taken from this encrypted volume, so it is encrypted with the same
  # key without the extra copy that encrypt_boot would make.

  tags          = local.tags
  snapshot_tags = local.tags
  run_tags      = merge(local.tags, { "Name" = "paddock-agent-image-build" })
}

build {
  sources = ["source.amazon-ebs.paddock_agent"]

  provisioner "file" {
    source      = var.agent_binary
    destination = "/tmp/paddock"
  }

  provisioner "shell" {
    execute_command = "sudo -S sh -eu '{{ .Path }}'"
    inline = [
      "cloud-init status --wait >/dev/null || true",
      "install -D -o root -g root -m 0755 /tmp/paddock /opt/paddock/bin/paddock",
      "rm -f /tmp/paddock",
      "/opt/paddock/bin/paddock --version",
      "if command -v apt-get >/dev/null; then export DEBIAN_FRONTEND=noninteractive; apt-get -q update; apt-get -q install -y --no-install-recommends git ca-certificates curl; apt-get clean; rm -rf /var/lib/apt/lists/*; else dnf -q -y install git; dnf clean all; fi",
      "git --version",
      # Machines launched from the image run cloud-init afresh, with their own user-data.
      "cloud-init clean --logs",
    ]
  }
}
