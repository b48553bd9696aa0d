"""Prepares the test S3 server (moto, with IAM auth after its first four
requests): a user with a key allowed everything, and the test bucket.
Prints the key id and secret."""
import json
import sys

import boto3

endpoint = sys.argv[1]
anon = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup", region_name="us-east-1")
iam = boto3.client("iam", **anon)
iam.create_user(UserName="vessel")
key = iam.create_access_key(UserName="vessel")["AccessKey"]
policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
iam.put_user_policy(UserName="vessel", PolicyName="all", PolicyDocument=json.dumps(policy))
s3 = boto3.client(
    "s3",
    endpoint_url=endpoint,
    aws_access_key_id=key["AccessKeyId"],
    aws_secret_access_key=key["SecretAccessKey"],
    region_name="us-east-1",
)
s3.create_bucket(Bucket="vessel-test")
print(key["AccessKeyId"], key["SecretAccessKey"])
