# A Paddock cluster "prod" in eu-west-1: master policy attached to the master's role, worker
# security group and instance profile, and a launch template.
#
#   terraform init && terraform apply -var vpc_id=vpc-... -var master_role_name=paddock-master

terraform {
  required_version = ">= 1.3"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}

provider "aws" {
  region = "eu-west-1"
}

variable "vpc_id" {
  description = "VPC the workers run in."
  type        = string
}

variable "master_role_name" {
  description = "Existing role the Paddock master runs as; null = attach the policy yourself."
  type        = string
  default     = null
}

module "paddock" {
  source = "../.."

  cluster_id       = "prod"
  vpc_id           = var.vpc_id
  master_role_name = var.master_role_name

  create_launch_template = true
  root_volume_size       = 40

  tags = {
    team = "ci"
  }
}

output "master_policy_arn" {
  value = module.paddock.master_policy_arn
}

output "worker_security_group_id" {
  value = module.paddock.worker_security_group_id
}

output "worker_instance_profile_name" {
  value = module.paddock.worker_instance_profile_name
}

output "launch_template_id" {
  value = module.paddock.launch_template_id
}
