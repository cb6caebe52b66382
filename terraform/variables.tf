variable "cluster_id" {
  description = "Paddock cluster id (one master and its database). Must equal `[master] cluster` in Paddock's config: the master tags every instance it launches with `paddock:cluster` = this value, and the master policy only lets it launch and terminate instances carrying that tag."
  type        = string

  validation {
    condition     = length(var.cluster_id) > 0 && can(regex("^[A-Za-z0-9_.-]+$", var.cluster_id))
    error_message = "cluster_id must be non-empty and use only letters, digits, '_', '.' and '-'."
  }
}

variable "vpc_id" {
  description = "VPC the workers run in. The worker security group is created here, and the master may only launch into subnets and security groups of this VPC."
  type        = string

  validation {
    condition     = can(regex("^vpc-[0-9a-f]+$", var.vpc_id))
    error_message = "vpc_id must be a VPC id such as vpc-0123456789abcdef0."
  }
}

variable "name_prefix" {
  description = "Prefix of the names of everything the module creates; names are <name_prefix>-<cluster_id>-<what>."
  type        = string
  default     = "paddock"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+$", var.name_prefix))
    error_message = "name_prefix must be non-empty and use only letters, digits, '_', '.' and '-'."
  }
}

variable "master_role_name" {
  description = "Name of an existing IAM role the Paddock master runs as (for example its EC2 instance role). The master policy is attached to it. null = do not attach; attach master_policy_arn yourself."
  type        = string
  default     = null
}

variable "allow_spot" {
  description = "Let the master ask for spot capacity (pools with `spot = true`). false = on-demand launches only."
  type        = bool
  default     = true
}

variable "ami_owners" {
  description = "If non-empty, the master may only launch AMIs owned by these owners (AWS account ids, or \"amazon\" / \"aws-marketplace\"). Empty = any AMI the account can see."
  type        = list(string)
  default     = []
}

variable "create_worker_instance_profile" {
  description = "Create an IAM role and instance profile for workers. No policy is attached to the role: Paddock's agent needs no AWS permission. Attach your own to worker_role_name if builds need AWS access."
  type        = bool
  default     = true
}

variable "extra_pass_role_arns" {
  description = "ARNs of roles, created outside this module, behind instance profiles that pools name in `iam_instance_profile`. The master may pass them (and only them, besides the module's worker role) to EC2."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for arn in var.extra_pass_role_arns : can(regex("^arn:[^:]+:iam::[0-9]{12}:role/", arn))])
    error_message = "extra_pass_role_arns must hold IAM role ARNs (arn:<partition>:iam::<account>:role/<name>)."
  }
}

variable "create_launch_template" {
  description = "Create a launch template for pools to name in `launch_template`. Paddock does not need one: it sets everything in RunInstances."
  type        = bool
  default     = false
}

variable "launch_template_ami_id" {
  description = "AMI of the launch template. null = none; pools then give `ami`."
  type        = string
  default     = null
}

variable "launch_template_instance_type" {
  description = "Default instance type of the launch template; a pool's `instance_types` override it."
  type        = string
  default     = "t3.small"
}

variable "root_device_name" {
  description = "Device name of the root volume in the launch template; it must match the AMI's root device."
  type        = string
  default     = "/dev/xvda"
}

variable "root_volume_size" {
  description = "Root volume size of the launch template, in GiB (gp3, encrypted)."
  type        = number
  default     = 30

  validation {
    condition     = var.root_volume_size >= 1 && var.root_volume_size <= 16384 && floor(var.root_volume_size) == var.root_volume_size
    error_message = "root_volume_size must be a whole number of GiB between 1 and 16384."
  }
}

variable "root_volume_kms_key_id" {
  description = "KMS key (ARN) encrypting the launch template's root volume. null = the account's default EBS key."
  type        = string
  default     = null
}

variable "instance_metadata_tags" {
  description = "Expose instance tags in the instance metadata of launch-template instances."
  type        = bool
  default     = false
}

variable "detailed_monitoring" {
  description = "Enable detailed (1-minute) CloudWatch monitoring on launch-template instances. Billed per instance; Paddock itself does not use it."
  type        = bool
  default     = false
}

variable "tags" {
  description = "Tags for everything the module creates (paddock:cluster is always added)."
  type        = map(string)
  default     = {}
}
